"""click plumbing for `nan-peft`: option sections in --help, commands in definition order, one-line errors;
the options generated from the spec's fields (nan_peft.spec), and YAML recipes checked against the same fields."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import NanPeftError, first_line
from ..spec import FoldSpec, MergeSpec, OutputSpec

SECTIONS = ("Input and output", "Coefficients", "Merge rule", "Combination", "Folding", "Extraction", "Execution")
RECIPE_KEYS = ("adapters", "output", "force", *(field.name for spec in (MergeSpec, OutputSpec, FoldSpec) for field in dataclasses.fields(spec)))
# Flags that change nothing in the output folder: left out of the recorded command so that reruns match.
UNRECORDED_FLAGS = ("--force", "--quiet", "-q", "--debug", "--json")


class _Option(click.Option):
    def __init__(self, *args, section: str = "General", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class _Command(click.Command):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Options under their sections' headings (--help last), first column aligned across sections."""
        sections: dict[str, list] = {}
        options = [p for p in self.get_params(ctx) if isinstance(p, click.Option)]
        last = next((p.section for p in reversed(options) if isinstance(p, _Option)), "Options")
        for param in options:
            row = param.get_help_record(ctx)
            if row is not None:
                sections.setdefault(getattr(param, "section", last), []).append(row)
        width = min(max((len(row[0]) for rows in sections.values() for row in rows), default=0), 30)
        for name, rows in sections.items():
            with formatter.section(name):
                formatter.write_dl([(first.ljust(width), rest) for first, rest in rows])


class _Group(click.Group):
    command_class = _Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        extra.setdefault("obj", {})["argv"] = ["nan-peft", *args]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        debug = "--debug" in (args[: args.index("--")] if "--" in args else args)
        try:
            code = super().main(args, prog_name or "nan-peft", complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as error:  # `nan-peft` alone: the help, as click shows it
            error.show()
            sys.exit(error.exit_code)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
            fail(f"{error.format_message()}{hint}", error.exit_code)
        except click.ClickException as error:
            fail(error.format_message(), error.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except (NanPeftError, OSError) as error:
            if debug:
                raise
            fail(str(error), 1)
        except Exception as error:  # a bug, not bad input: still one line unless --debug
            if debug:
                raise
            fail(f"{type(error).__name__}: {first_line(error)} (run again with --debug for the traceback)", 1)
        sys.exit(code if isinstance(code, int) else 0)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def fail(message: str, code: int) -> None:
    click.echo(f"error: {first_line(message)}", err=True)
    sys.exit(code)


def opt(*decls, **kwargs):
    return click.option(*decls, cls=_Option, **kwargs)


def output_options(json_flag: bool = True):
    def decorate(command):
        if json_flag:
            command = opt("--json", "as_json", is_flag=True, section="Output", help="Print a JSON document (keys: see `nan_peft.cli`) instead of a table.")(command)
        command = opt("-q", "--quiet", is_flag=True, section="Output", help="No progress bars or notes on stderr.")(command)
        command = opt("--debug", is_flag=True, section="Output", help="Show the traceback of an error.")(command)
        return command

    return decorate


def spec_options(*specs: type):
    """click options for every field of `specs`, grouped by section in SECTIONS order: --name-with-dashes (or the
    field's flag), its choices or type, its help and metavar. Each defaults to None, so that a recipe can fill
    what the command line leaves out."""
    fields = [field for spec in specs for field in dataclasses.fields(spec)]
    fields.sort(key=lambda field: SECTIONS.index(field.metadata["section"]))

    def decorate(command):
        for field in reversed(fields):
            meta = field.metadata
            decls = [meta["flag"] or f"--{field.name.replace('_', '-')}", field.name]
            kwargs = {"section": meta["section"], "help": meta["help"], "default": None}
            if meta["choices"]:
                kwargs["type"] = click.Choice(list(meta["choices"]))
            elif meta["kind"] is bool and not meta["flag"]:
                kwargs["is_flag"] = True
            elif meta["kind"] is list:  # repeatable: --name A --name B
                kwargs["multiple"] = True
            elif meta["kind"] is int:
                kwargs["type"] = click.IntRange(min=meta["minimum"]) if meta["minimum"] is not None else int
            elif meta["kind"] == (int, float):
                kwargs["type"] = float
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            command = opt(*decls, **kwargs)(command)
        return command

    return decorate


def build_specs(given: dict, recipe: dict) -> tuple[MergeSpec, OutputSpec, FoldSpec]:
    """The three specs from the command line's options (those given) over the recipe's."""
    built = []
    for spec in (MergeSpec, OutputSpec, FoldSpec):
        values = {}
        for field in dataclasses.fields(spec):
            value = given.get(field.name)
            value = recipe.get(field.name) if value is None else value
            if value is not None:
                parse = field.metadata["parse"]
                values[field.name] = parse(value) if parse else value
        built.append(spec(**values))
    return tuple(built)  # type: ignore[return-value]


_WHAT = {bool: "true or false", int: "an integer", (int, float): "a number", (int, float, str): "a number or auto", str: "a string", (str, list): "a list of numbers",
         (str, dict): "a device map (auto, balanced, ... or a mapping)", list: "a list"}  # fmt: skip


def load_recipe(path: str) -> dict:
    """A YAML recipe's options (keys: RECIPE_KEYS, dashes or underscores), each of the type its field takes."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise NanPeftError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise NanPeftError(f"{path}: not valid YAML ({first_line(error)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NanPeftError(f"{path}: a recipe is a mapping of option names to values")
    recipe = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise NanPeftError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(RECIPE_KEYS)})")
    adapters = recipe.get("adapters")
    if adapters is not None and (not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters)):
        raise NanPeftError(f"{path}: 'adapters' must be a list of folders or Hub ids")
    kinds = {"force": bool, "output": str, "adapters": list}
    kinds.update({field.name: field.metadata["kind"] or str for spec in (MergeSpec, OutputSpec, FoldSpec) for field in dataclasses.fields(spec)})
    for key, value in recipe.items():
        kind = kinds[key]
        types = kind if isinstance(kind, tuple) else (kind,)
        # YAML's own true/false for flags (a quoted "false" is a true string), and no true/false for numbers
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) != (types == (bool,))):
            raise NanPeftError(f"{path}: {key!r} must be {_WHAT[kind]}, not {value!r}")
    return recipe


def progress(quiet: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=True if quiet else None, leave=False, **kwargs)


@contextlib.contextmanager
def stage(description: str, quiet: bool):
    """A one-step progress bar around work the library does in one call."""
    with progress(quiet, total=1, desc=description, bar_format="{desc}: {elapsed}") as bar:
        yield
        bar.update(1)


def note(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(message, err=True)


def read_sources(paths, quiet: bool, allow_different_bases: bool = False, allow_duplicates: bool = False):
    """reader.read_adapters with a progress bar: each adapter read once, then checked together once."""
    from ..reader import read_adapters

    with progress(quiet, total=len(paths), desc="reading", unit="adapter") as bar:
        return read_adapters(paths, allow_different_bases=allow_different_bases, allow_duplicates=allow_duplicates, on_read=lambda: bar.update(1))


@click.group(
    "nan-peft",
    cls=_Group,
    epilog=(
        "Start with `nan-peft demo`: it builds a tiny model and three adapters locally, merges them and checks the "
        "result. Then `nan-peft norms A B C` to see the coefficients, `nan-peft merge A B C -o merged` to merge."
    ),
)
@click.version_option(__version__, prog_name="nan-peft")
def cli() -> None:
    """Merge LoRA adapters (peft format) with NAN coefficients: each adapter weighs in proportion to the inverse
    norm of its update (arXiv 2505.16148), computed exactly from r x r Gram matrices."""


def main() -> None:
    cli.main(prog_name="nan-peft")
