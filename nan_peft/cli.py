"""The `nan-peft` command line: merge, norms, inspect, demo. A thin edge over the library: parse, call, format.

Errors print one line, ``error: ...``, on stderr: exit code 1 for bad input or an impossible request, 2 for a
command-line usage error. ``--debug`` shows the traceback instead. Progress bars go to stderr (hidden by
``--quiet`` or when stderr is not a terminal); tables and JSON go to stdout.

JSON output (``--json``); keys are stable, new keys may be added:

``nan-peft merge --json``::

    {"output": str,                      # the output folder, as given
     "files": [str],                     # file names written into it
     "rank": int,                        # the merged adapter's one global rank
     "method": str,                      # the merge rule: task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune
     "rule": {option: value},            # the rule's options as used (density, scale, normalize; seed for dare_*)
     "combine": "cat" | "svd",
     "dtype": str,                       # dtype of the written factors
     "device": str,                      # where the merge ran
     "coefficients": {"method": "nan" | "uniform" | "manual",
                      "granularity": "adapter" | "module",
                      "exponent": float | null,   # null where the method takes none (manual, uniform)
                      "total": float | null},     # sum of the coefficients asked for (null for manual)
     "adapters": [{"name": str, "path": str,     # path as given
                   "norm": float,                # ||dW_k||_F over all modules
                   "coefficient": float | null}],  # null with granularity "module"
     "modules": [{"module": str, "input_rank": int, "rank": int,
                  "norm": float,                 # ||sum_k c_k dW_k||_F at this module (exact merge)
                  "discarded": float,            # ||dW - dW_r||_F dropped by svd truncation (0 for cat)
                  "relative_discarded": float,
                  "coefficients": {adapter name: float}}],
     "serve": "vllm" | "sglang" | "lorax" | "tgi" | "trtllm" | "llamacpp" | "peft" | null,  # the engine fitted to (--serve)
     "tensor_parallel": int | null,      # the engine's tensor-parallel degree (--tensor-parallel; null without --serve)
     "engine_version": str | null,       # the engine version whose rules applied (named, or the installed one)
     "fold_into": str | null,            # the base model folded into (--fold-into): OUTPUT is then a full model
     "heads": {"mode": "drop" | "per-task" | "keep",  # what became of full modules the adapters carry
               "shared": [str],                  # state-dict keys identical in every adapter
               "tasks": {adapter name: [str]}}}  # each adapter's own (per-task: written to OUTPUT/<name>/)

``nan-peft norms --json``::

    {"adapters": [{"name", "path", "ranks": [int], "modules": int, "norm": float}],
     "cosine_similarity": [[float]],     # K x K, rows and columns in the order of "adapters"
     "options": [{"coefficients": str, "granularity": str, "exponent": float | null, "total": float,
                  "per_adapter": {name: float} | null,           # null with granularity "module"
                  "per_module_range": {name: [min, max]},       # over the modules each adapter adapts
                  "merged_norm": float | null,                  # ||sum_k c_k dW_k||_F over all modules
                  "error": str | null}],                        # why this option is impossible here
     "modules": [{"module": str, "norms": {name: float}}]}     # absent adapters are left out

``nan-peft inspect --json``::

    {"name", "path", "base_model": str | null, "task_type": str | null, "format": "safetensors" | "bin",
     "r": int, "lora_alpha": float, "ranks": [int], "scaling": {"rule": str, "values": [float]},
     "rank_pattern": {}, "alpha_pattern": {}, "target_modules": [str], "modules": int, "layers": [int],
     "kinds": {kind: int}, "dtypes": [str], "parameters": int, "size_bytes": int, "variants": [str],
     "serving": {engine: {"loads": bool, "findings": [{"level": "error" | "warning" | "info", "message": str}]}}}
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import NanPeftError
from .rules import RULES
from .serving import ENGINES

MERGE_OPTIONS = ("method", "density", "scale", "normalize", "seed", "majority_sign_method", "combine", "rank", "coefficients", "weights", "granularity", "exponent", "total", "device", "dtype", "allow_different_bases", "allow_duplicates")
RECIPE_KEYS = ("adapters", "output", "force", "heads", "serve", "tensor_parallel", "engine_version", "format", "base", "fold_into", "device_map", "max_memory", *MERGE_OPTIONS)
HEADS = ("drop", "per-task", "keep")
FORMATS = ("peft", "gguf")
DTYPES = ("float32", "float16", "bfloat16")
# Flags that change nothing in the output folder: left out of the recorded command so that reruns match.
UNRECORDED_FLAGS = ("--force", "--quiet", "-q", "--debug", "--json")


# ----------------------------------------------------------------------------------------------------------
# click plumbing: option sections in --help, commands in definition order, one-line errors


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
            _fail(f"{error.format_message()}{hint}", error.exit_code)
        except click.ClickException as error:
            _fail(error.format_message(), error.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except (NanPeftError, OSError) as error:
            if debug:
                raise
            _fail(str(error), 1)
        except Exception as error:  # a bug, not bad input: still one line unless --debug
            if debug:
                raise
            _fail(f"{type(error).__name__}: {_first_line(error)} (run again with --debug for the traceback)", 1)
        sys.exit(code if isinstance(code, int) else 0)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {_first_line(message)}", err=True)
    sys.exit(code)


def _first_line(text) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(text).__name__


def _opt(*decls, **kwargs):
    return click.option(*decls, cls=_Option, **kwargs)


def _output_options(json_flag: bool = True):
    def decorate(command):
        if json_flag:
            command = _opt("--json", "as_json", is_flag=True, section="Output", help="Print a JSON document (keys: see `nan_peft.cli`) instead of a table.")(command)
        command = _opt("-q", "--quiet", is_flag=True, section="Output", help="No progress bars or notes on stderr.")(command)
        command = _opt("--debug", is_flag=True, section="Output", help="Show the traceback of an error.")(command)
        return command

    return decorate


def _progress(quiet: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=True if quiet else None, leave=False, **kwargs)


@contextlib.contextmanager
def _stage(description: str, quiet: bool):
    """A one-step progress bar around work the library does in one call."""
    with _progress(quiet, total=1, desc=description, bar_format="{desc}: {elapsed}") as bar:
        yield
        bar.update(1)


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(message, err=True)


def _read(paths, quiet: bool, allow_different_bases: bool = False, allow_duplicates: bool = False):
    """read_adapter for each path with a progress bar, then the library's compatibility checks."""
    from .reader import read_adapter, read_adapters

    adapters = []
    with _progress(quiet, total=len(paths), desc="reading", unit="adapter") as bar:
        for path in paths:
            adapters.append(read_adapter(path))
            bar.update(1)
    return read_adapters(adapters, allow_different_bases=allow_different_bases, allow_duplicates=allow_duplicates)


def _table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_json(document) -> None:
    click.echo(json.dumps(document, indent=2))


# ----------------------------------------------------------------------------------------------------------
# the commands


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


@cli.command(short_help="Merge adapters into one, with NAN coefficients by default.")
@click.argument("adapters", nargs=-1, metavar="[ADAPTER]...")
@_opt("-o", "--output", metavar="DIR", section="Input and output", help="Folder to write the merged adapter to.")
@_opt("--config", "recipe", type=click.Path(dir_okay=False), metavar="RECIPE.yaml", section="Input and output",
      help="YAML recipe with the same option names (adapters, output, combine, ...; paths relative to the current "
           "folder); options given here override it.")
@_opt("--force", is_flag=True, section="Input and output", help="Replace OUTPUT if it exists (atomically).")
@_opt("--allow-different-bases", is_flag=True, default=None, section="Input and output",
      help="Merge adapters whose configs name different base models.")
@_opt("--allow-duplicates", is_flag=True, default=None, section="Input and output",
      help="Merge the same adapter more than once (it then weighs more).")
@_opt("--serve", type=click.Choice(ENGINES), section="Input and output",
      help="Fit the output to a serving engine (rank padded to one it takes, tensors it refuses left out), say what "
      "changed, and refuse if it still could not serve it.")
@_opt("--tensor-parallel", "tensor_parallel", type=click.IntRange(min=1), metavar="N", section="Input and output",
      help="The engine's tensor-parallel degree, with --serve (LoRAX and TGI pad ranks by it) [default 1].")
@_opt("--engine-version", "engine_version", metavar="V", section="Input and output",
      help="The engine version to fit, with --serve (vLLM 0.32 and later honour rank/alpha patterns) [default: installed, else the oldest rules].")
@_opt("--format", "file_format", type=click.Choice(FORMATS), section="Input and output",
      help="peft: adapter_config.json + adapter_model.safetensors [default]; gguf: adapter_model.gguf for llama.cpp "
      "and Ollama (implies --serve llamacpp; needs --base; pip install 'nan-peft[gguf]').")
@_opt("--base", metavar="BASE", section="Input and output",
      help="The base model's folder (its config.json) for --format gguf [default: base_model_name_or_path, when a local folder].")
@_opt("--heads", type=click.Choice(HEADS), section="Input and output",
      help="Full modules the adapters carry (modules_to_save, e.g. task heads): drop them [default], write "
      "OUTPUT/<task>/ with each task's own head beside the merge (per-task), or keep them when all adapters share them.")
@_opt("--coefficients", type=click.Choice(["nan", "uniform", "manual"]), section="Coefficients",
      help="nan: c_k ~ ||dW_k||^-p [default]; uniform: c_k = total/K; manual: --weights.")
@_opt("--weights", metavar="W1,W2,...", section="Coefficients", help="Manual coefficients, one per adapter (implies --coefficients manual).")
@_opt("--granularity", type=click.Choice(["adapter", "module"]), section="Coefficients",
      help="One coefficient per adapter (norm over all its modules) [default] or one per module.")
@_opt("--exponent", type=float, metavar="P", section="Coefficients", help="p in c_k ~ ||dW_k||^-p [default 1: the paper's].")
@_opt("--total", type=float, metavar="T", section="Coefficients", help="What the coefficients sum to [default 1].")
@_opt("--method", type=click.Choice(list(RULES)), section="Merge rule",
      help="The rule the coefficients are plugged into [default task_arithmetic: scale * sum_k c_k dW_k].")
@_opt("--density", type=float, metavar="D", section="Merge rule", help="Fraction of entries kept (ties, dare_*, magnitude_prune).")
@_opt("--scale", type=float, metavar="L", section="Merge rule", help="lambda: multiplies the merged update [default 1].")
@_opt("--normalize/--no-normalize", default=None, section="Merge rule", help="ties, dare_ties: average the agreeing entries (default) or sum them.")
@_opt("--seed", type=int, section="Merge rule", help="Seed of the random drops (dare_*) [default 0].")
@_opt("--majority-sign-method", "majority_sign_method", type=click.Choice(["total", "frequency"]), section="Merge rule",
      help="ties, dare_ties: elect each entry's sign by mass [total, default] or by vote (frequency), as peft's.")
@_opt("--combine", type=click.Choice(["cat", "svd"]), section="Combination",
      help="cat: exact, rank = sum of ranks [default for task_arithmetic]; svd: best rank-R approximation.")
@_opt("--rank", type=click.IntRange(min=1), metavar="R", section="Combination", help="Target rank (svd: required; cat: pad up to R).")
@_opt("--fold-into", "fold_into", metavar="BASE", section="Folding",
      help="Write a full model instead of an adapter: BASE (a transformers safetensors folder) + the exact merged "
      "update (never truncated by --rank), streamed shard by shard.")
@_opt("--device-map", metavar="auto|balanced|sequential|cpu", section="Folding",
      help="Fold with the model loaded and spread by accelerate instead of streaming (updates added where each weight lives).")
@_opt("--max-memory", metavar="0=20GiB,cpu=64GiB", section="Folding", help="Memory per device for --device-map.")
@_opt("--device", metavar="cpu|cuda|auto", section="Execution", help="Where to compute [default cpu].")
@_opt("--dtype", type=click.Choice(DTYPES), section="Execution", help="dtype of the written factors [default: the inputs'].")
@_output_options()
@click.pass_context
def merge(ctx: click.Context, adapters, output, recipe, force, as_json, quiet, debug, **given) -> None:
    """Merge ADAPTER folders (or Hub ids) into one LoRA adapter written to OUTPUT, with a merge record
    (merge_record.json) and a model card (README.md). Prints adapters, norms and coefficients.

    \b
    Examples:
      nan-peft merge math code chat -o merged
      nan-peft merge math code -o merged --combine svd --rank 16
      nan-peft merge math code -o merged --weights 0.7,0.3
      nan-peft merge --config recipe.yaml --force
    """
    from .merge import merge_adapters
    from .record import input_entry, merge_record, provenance_files
    from .writer import check_output

    recipe_data = _load_recipe(recipe) if recipe else {}
    heads = given.pop("heads", None) or recipe_data.get("heads") or "drop"
    serve = given.pop("serve", None) or recipe_data.get("serve")
    deployment = {key: given.pop(key, None) or recipe_data.get(key) for key in ("tensor_parallel", "engine_version")}
    file_format = given.pop("file_format", None) or recipe_data.get("format") or "peft"
    gguf_base = given.pop("base", None) or recipe_data.get("base")
    if file_format not in FORMATS:
        raise NanPeftError(f"{recipe}: format must be one of {', '.join(FORMATS)}, not {file_format!r}")
    if file_format == "gguf":
        if serve not in (None, "llamacpp") or heads == "per-task":
            raise click.UsageError("--format gguf writes one llama.cpp adapter: --serve llamacpp (implied) and no --heads per-task", ctx)
        serve = "llamacpp"
    elif gguf_base is not None:
        raise click.UsageError("--base goes with --format gguf (--fold-into takes the base model to fold into)", ctx)
    fold = {key: given.pop(key, None) or recipe_data.get(key) for key in ("fold_into", "device_map", "max_memory")}
    if fold["fold_into"] is None and (fold["device_map"] or fold["max_memory"]):
        raise click.UsageError("--device-map and --max-memory go with --fold-into", ctx)
    if fold["fold_into"] is not None and (serve or heads != "drop"):
        raise click.UsageError("--fold-into writes a full model: --serve and --heads do not apply", ctx)
    if serve is not None and serve not in ENGINES:
        raise NanPeftError(f"{recipe}: serve must be one of {', '.join(ENGINES)}, not {serve!r}")
    if serve is None and any(value is not None for value in deployment.values()):
        raise click.UsageError("--tensor-parallel and --engine-version go with --serve", ctx)
    target = None
    if serve is not None:
        from .serving import target_for

        target = target_for(serve, deployment["tensor_parallel"] or 1, deployment["engine_version"])
    if heads not in HEADS:
        raise NanPeftError(f"{recipe}: heads must be one of {', '.join(HEADS)}, not {heads!r}")
    options = {key: recipe_data[key] for key in MERGE_OPTIONS if recipe_data.get(key) is not None}
    options.update({key: value for key, value in given.items() if value is not None})
    paths = list(adapters) or recipe_data.get("adapters") or []
    output = output or recipe_data.get("output")
    force = force or bool(recipe_data.get("force"))
    if not paths:
        raise click.UsageError("give at least one ADAPTER (or a --config recipe that lists adapters)", ctx)
    if not output:
        raise click.UsageError("give the output folder with -o / --output (or `output:` in the recipe)", ctx)
    if "weights" in options:
        options["weights"] = _weights(options["weights"])
        options.setdefault("coefficients", "manual")
    if options.get("dtype", DTYPES[0]) not in DTYPES:
        raise NanPeftError(f"unknown dtype {options['dtype']!r}; choose from {', '.join(DTYPES)}")
    device = _device(options.pop("device", None))
    check_output(output, force, "--force")

    sources = _read(paths, quiet, bool(options.get("allow_different_bases")), bool(options.get("allow_duplicates")))
    base_config = _gguf_base_config(gguf_base or sources[0].base_model) if file_format == "gguf" else None
    with _stage("norms, coefficients, merge", quiet):
        result = merge_adapters(sources, device=device, **options)
    inputs = [input_entry(path, source.source, source.name) for path, source in zip(paths, sources)]
    command = [arg for arg in ctx.obj.get("argv", ["nan-peft", "merge"]) if arg not in UNRECORDED_FLAGS]
    deployed = {"tensor_parallel": target.tensor_parallel, "engine_version": target.version} if target else {}
    if file_format == "gguf":
        deployed.update(format="gguf", base=gguf_base or result.adapter.base_model)
    record = merge_record(result, inputs, command, {"device": str(device), "heads": heads, "serve": serve, **deployed}, recipe=recipe_data or None)
    plan = None
    if target is not None:
        from .serving import plan_for

        plan = plan_for(result.adapter_for(heads.replace("-", "_")), target, where=output)
        plan.raise_for_errors()
        record["rank"] = plan.rank  # the rank written: padded for the engine
    if fold["fold_into"] is not None:
        from .fold import parse_max_memory, resolve_base
        from .hub import provenance

        record["options"]["fold_into"] = fold["fold_into"]
        base = resolve_base(fold["fold_into"])  # once: the folder folded is the commit recorded
        base_source = provenance(fold["fold_into"], base)
        if base_source is not None:
            record["fold_into_hub"] = base_source
        memory = parse_max_memory(fold["max_memory"]) if fold["max_memory"] else None
        if fold["device_map"] and (quiet or not sys.stderr.isatty()):  # transformers' own loading/saving bars
            from transformers.utils.logging import disable_progress_bar

            disable_progress_bar()
        with _stage(f"folding into {fold['fold_into']}: {output}", quiet):
            written = result.fold_into(base, output, device=device, device_map=fold["device_map"], max_memory=memory,
                                       overwrite=force, extra_files=provenance_files(result, record, output))
        _report_merge(result, record, output, written, as_json)
        return
    if plan is not None:
        for message in plan.changes + [f"{f.level}: {f.message}" for f in plan.findings if f.level != "info"]:
            _note(f"{serve}: {message}", quiet)
    files = provenance_files(result, record, output)
    for notice in result.notices(heads.replace("-", "_")):
        _note(f"note: {notice}", quiet)
    with _stage(f"writing {output}", quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes above said it
        if file_format == "gguf":
            from .gguf_lora import write_gguf_lora

            protected = [source.source for source in result.sources if source.source]
            write_gguf_lora(plan.adapter, base_config, output, rank=plan.rank, overwrite=force, extra_files=files, protected=protected)
            written = Path(output)
        else:
            written = result.save_pretrained(output, overwrite=force, extra_files=files, heads=heads.replace("-", "_"), serve=plan)

    _report_merge(result, record, output, written, as_json)


def _gguf_base_config(base: str | None) -> dict:
    """The base model's config.json for --format gguf, read before the merge: --base, else the adapters' recorded
    base model when it is a local folder (nothing is downloaded)."""
    from .gguf_lora import gguf_architecture, read_base_config

    if not base or not Path(base, "config.json").is_file():
        raise NanPeftError(f"--format gguf needs the base model's config.json: pass --base BASE (its folder){f'; {base} is not one' if base else ''}")
    config = read_base_config(base)
    gguf_architecture(config)
    return config


def _report_merge(result, record: dict, output: str, written, as_json: bool) -> None:
    document = _merge_document(result, record, output, sorted(p.name for p in Path(written).iterdir()))
    if as_json:
        _print_json(document)
        return
    rows = [[a["name"], a["path"], _g(a["norm"]), "per module" if a["coefficient"] is None else _g(a["coefficient"])] for a in document["adapters"]]
    click.echo(_table(["adapter", "path", "norm", "coefficient"], rows, right={2, 3}))
    c = document["coefficients"]
    rule = ", ".join(f"{key} {value}" for key, value in document["rule"].items())
    click.echo(
        f"\n{c['method']} coefficients ({c['granularity']}"
        + (f", exponent {_g(c['exponent'])}" if c["exponent"] is not None else "")
        + (f", total {_g(c['total'])}" if c["total"] is not None else "")
        + f"), {document['method']} rule" + (f" ({rule})" if rule else "")
        + f"; {document['combine']} merge of {len(document['modules'])} modules, rank {document['rank']}"
    )
    if document["combine"] == "svd" and document["modules"]:
        worst = max(document["modules"], key=lambda m: m["relative_discarded"])
        click.echo(f"largest relative truncation error: {_g(worst['relative_discarded'])} ({worst['module']})")
    if document["fold_into"]:
        click.echo(f"folded the exact merge (no truncation) into {document['fold_into']}: wrote the full model {output}")
    else:
        click.echo(f"wrote {output} ({', '.join(document['files'])})")


def _merge_document(result, record: dict, output: str, files: list[str]) -> dict:
    from .record import module_entry

    coefficients = result.coefficients
    per_adapter = record["coefficients"]["per_adapter"]
    names = list(result.gram.adapter_names)
    by_module = dict(zip(coefficients.modules, coefficients.values.tolist()))
    present = dict(zip(result.gram.modules, result.gram.present.tolist()))
    modules = []
    for report in result.report:
        entry = module_entry(report)
        entry["coefficients"] = {n: c for n, c, here in zip(names, by_module[report.module], present[report.module]) if here}
        modules.append(entry)
    return {
        "output": output,
        "files": files,
        "rank": record["rank"],
        "combine": result.options["combine"],
        "dtype": result.options["dtype"],
        "device": record["options"]["device"],
        "method": result.options["method"],
        "rule": _rule_options(result.options),
        "coefficients": {"method": coefficients.method, "granularity": coefficients.granularity, **_effective(coefficients.method, result.options)},
        "adapters": [
            {"name": entry["name"], "path": entry["path"], "norm": record["norms"][entry["name"]], "coefficient": None if per_adapter is None else per_adapter[entry["name"]]}
            for entry in record["inputs"]
        ],
        "modules": modules,
        "serve": record["options"]["serve"],
        "tensor_parallel": record["options"].get("tensor_parallel"),
        "engine_version": record["options"].get("engine_version"),
        "fold_into": record["options"].get("fold_into"),
        "heads": {
            "mode": record["options"]["heads"],
            "shared": sorted(result.shared_saved),
            "tasks": {name: sorted(tensors) for name, tensors in sorted(result.heads.items())},
        },
    }


def _effective(method: str, options: dict) -> dict:
    """exponent and total as the coefficient provider used them: given, else its default; None if it takes none."""
    from .coefficients import PROVIDERS

    parameters = inspect.signature(PROVIDERS[method]).parameters
    effective = {}
    for name in ("exponent", "total"):
        if name not in parameters:
            effective[name] = None
        else:
            value = options.get(name)
            effective[name] = float(value if value is not None else parameters[name].default)
    return effective


def _rule_options(options: dict) -> dict:
    """The merge rule's options as it used them: given, else the rule's defaults (seed only for random rules)."""
    from .rules import rule_options

    method = options["method"]
    parameters = list(inspect.signature(RULES[method]).parameters.values())[3:]
    effective = {p.name: options.get(p.name, None if p.default is p.empty else p.default) for p in parameters}
    _, seed = rule_options(method, {name: options.get(name) for name in (*effective, "seed")})
    if seed is not None:
        effective["seed"] = seed
    return effective


def _load_recipe(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise NanPeftError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise NanPeftError(f"{path}: not valid YAML ({_first_line(error)})") from None
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
    for key, value in recipe.items():
        types, what = _RECIPE_TYPES.get(key, (object, ""))
        # YAML's own true/false for flags (a quoted "false" is a true string), and no true/false for numbers
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) != (types == (bool,))):
            raise NanPeftError(f"{path}: {key!r} must be {what}, not {value!r}")
    return recipe


_RECIPE_TYPES = {  # key: (accepted types, what to say)
    **dict.fromkeys(("force", "allow_different_bases", "allow_duplicates", "normalize"), ((bool,), "true or false")),
    **dict.fromkeys(("rank", "seed", "tensor_parallel"), ((int,), "an integer")),
    **dict.fromkeys(("density", "scale", "exponent", "total"), ((int, float), "a number")),
    **dict.fromkeys(("output", "method", "combine", "coefficients", "granularity", "device", "dtype", "heads", "serve",
                     "majority_sign_method", "engine_version", "format", "base", "fold_into", "max_memory"), ((str,), "a string")),
    "weights": ((str, list), "a list of numbers"),
    "device_map": ((str, dict), "a device map (auto, balanced, ... or a mapping)"),
    "adapters": ((list,), "a list"),
}


def _weights(value) -> list[float]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise NanPeftError(f"weights must be a comma-separated list of numbers, got {value!r}")
    try:
        return [float(item) for item in items]
    except (TypeError, ValueError):
        raise NanPeftError(f"weights must be a comma-separated list of numbers, got {value!r}") from None


def _device(name):
    from .devices import resolve_device
    from .merge import merge_adapters

    if name is None:  # the library's default, resolved so that the record says where the merge ran
        name = inspect.signature(merge_adapters).parameters["device"].default
    return resolve_device(name)


def _g(value: float) -> str:
    return f"{value:.4g}"


@cli.command(short_help="Norms, cosine similarities and the coefficients each option gives.")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@_opt("--allow-different-bases", is_flag=True, section="Input", help="Accept adapters whose configs name different base models.")
@_opt("--device", metavar="cpu|cuda|auto", section="Execution", help="Where to compute [default cpu].")
@_output_options()
def norms(adapters, allow_different_bases, device, as_json, quiet, debug) -> None:
    """Show each ADAPTER's update norm ||dW||_F, the pairwise cosine similarities of the updates and the
    coefficients NAN (and uniform) would give, computed from r x r Gram matrices. Writes nothing."""
    from .coefficients import coefficients_for
    from .norms import update_gram

    sources = _read(list(adapters), quiet, allow_different_bases, allow_duplicates=True)  # shown, not merged
    with _stage("norms", quiet):
        gram = update_gram(sources, _device(device))
    names = list(gram.adapter_names)
    options = []
    for method, granularity, exponent in (("nan", "adapter", 1.0), ("nan", "adapter", 2.0), ("nan", "module", 1.0), ("uniform", "adapter", None)):
        entry = {"coefficients": method, "granularity": granularity, "exponent": exponent, "total": 1.0,
                 "per_adapter": None, "per_module_range": None, "merged_norm": None, "error": None}
        try:
            coeffs = coefficients_for(method, gram, granularity=granularity, exponent=exponent)
        except NanPeftError as error:
            entry["error"] = str(error)
            options.append(entry)
            continue
        if coeffs.per_adapter is not None:
            entry["per_adapter"] = dict(zip(names, coeffs.per_adapter.tolist()))
        values, present = coeffs.values, gram.present
        entry["per_module_range"] = {
            name: [values[present[:, k], k].min().item(), values[present[:, k], k].max().item()] for k, name in enumerate(names)
        }
        entry["merged_norm"] = gram.merged_norms(values).square().sum().sqrt().item()
        options.append(entry)
    module_norms = gram.module_norms.tolist()
    present = gram.present.tolist()
    document = {
        "adapters": [
            {"name": a.name, "path": path, "ranks": sorted(a.ranks), "modules": len(a.modules), "norm": n}
            for a, path, n in zip(sources, adapters, gram.adapter_norms.tolist())
        ],
        "cosine_similarity": gram.cosine_similarity().tolist(),
        "options": options,
        "modules": [
            {"module": module, "norms": {n: v for n, v, here in zip(names, row, here_row) if here}}
            for module, row, here_row in zip(gram.modules, module_norms, present)
        ],
    }
    if as_json:
        _print_json(document)
        return
    headers = ["adapter", "ranks", "modules", "norm"]
    columns = []
    for entry in options:
        label = {"nan": "NAN", "uniform": "uniform"}[entry["coefficients"]]
        if entry["coefficients"] == "nan":
            label += f" p={_g(entry['exponent'])}" + (" per module" if entry["granularity"] == "module" else "")
        headers.append(label)
        columns.append(entry)
    rows = []
    for a in document["adapters"]:
        row = [a["name"], ",".join(map(str, a["ranks"])), a["modules"], _g(a["norm"])]
        for entry in columns:
            if entry["error"]:
                row.append("-")
            elif entry["per_adapter"] is not None:
                row.append(_g(entry["per_adapter"][a["name"]]))
            else:
                low, high = entry["per_module_range"][a["name"]]
                row.append(_g(low) if _g(low) == _g(high) else f"{_g(low)}..{_g(high)}")
        rows.append(row)
    click.echo(_table(headers, rows))
    click.echo("\ncosine similarity of the updates")
    click.echo(_table(["", *names], [[name, *(f"{v:.3f}" for v in row)] for name, row in zip(names, document["cosine_similarity"])]))
    click.echo("\n||sum_k c_k dW_k||_F: " + ", ".join(f"{h} {_g(e['merged_norm'])}" for h, e in zip(headers[4:], columns) if e["merged_norm"] is not None))
    for header, entry in zip(headers[4:], columns):
        if entry["error"]:
            click.echo(f"{header}: {entry['error']}")


@cli.command("inspect", short_help="What an adapter is and which serving engines load it.")
@click.argument("adapter", metavar="ADAPTER")
@_opt("--tensor-parallel", "tensor_parallel", type=click.IntRange(min=1), default=1, metavar="N",
      help="The engines' tensor-parallel degree (LoRAX and TGI pad ranks by it) [default 1].")
@_opt("--engine-version", "engine_version", metavar="V",
      help="The engine version whose rules apply (vLLM 0.32 and later honour rank/alpha patterns) [default: installed, else the oldest rules].")
@_output_options()
def inspect_adapter(adapter, tensor_parallel, engine_version, as_json, quiet, debug) -> None:
    """Describe ADAPTER (base model, ranks, scaling, target modules, layers, size, variants such as rsLoRA) and
    check whether the serving engines (vLLM, SGLang, LoRAX, TGI, TensorRT-LLM, llama.cpp) and peft would serve it
    as peft does, with the flags to pass."""
    from .reader import SAFETENSORS_NAME
    from .serving import ENGINES, layer_index, loads, module_type, serving_findings

    (source,) = _read([adapter], quiet)
    config = source.config
    folder = Path(source.source)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    scales = sorted({m.scale for m in source.modules.values()})
    kinds: dict[str, int] = {}
    for module in source.modules.values():
        kinds[module.kind] = kinds.get(module.kind, 0) + 1
    findings = serving_findings(source, tensor_parallel, engine_version, where=adapter, files=files)
    document = {
        "name": source.name,
        "path": adapter,
        "base_model": source.base_model,
        "task_type": config.get("task_type"),
        "format": "safetensors" if SAFETENSORS_NAME in files else "bin",
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "ranks": sorted(source.ranks),
        "scaling": {"rule": "lora_alpha/sqrt(r) (rsLoRA)" if config.get("use_rslora") else "lora_alpha/r", "values": scales},
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "target_modules": sorted({module_type(p) for p in source.modules}),
        "modules": len(source.modules),
        "layers": sorted({i for i in map(layer_index, source.modules) if i is not None}),
        "kinds": kinds,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for m in source.modules.values() for t in (m.A, m.B)}),
        "parameters": source.num_parameters,
        "size_bytes": sum(size for name, size in files.items() if name.startswith("adapter_")),
        "variants": _variants(source, kinds),
        "serving": {engine: {"loads": loads(findings[engine]), "findings": [f.as_dict() for f in findings[engine]]} for engine in ENGINES},
    }
    if as_json:
        _print_json(document)
        return
    d = document
    scaling = ", ".join(_g(s) for s in d["scaling"]["values"])
    lines = [
        f"adapter      {d['path']}",
        f"base model   {d['base_model'] or '(not recorded)'}" + (f"  task {d['task_type']}" if d["task_type"] else ""),
        f"rank         {', '.join(map(str, d['ranks']))}  (config r={d['r']}, lora_alpha={_g(d['lora_alpha'])})",
        f"scaling      {d['scaling']['rule']} = {scaling}",
        f"targets      {', '.join(d['target_modules'])}  ({d['modules']} modules"
        + (f", layers {_ranges(d['layers'])})" if d["layers"] else ")"),
        f"size         {d['parameters']:,} parameters, {d['size_bytes']:,} bytes ({d['format']}, {', '.join(d['dtypes'])})",
        f"variants     {', '.join(d['variants']) or 'plain LoRA'}",
        "",
        "serving",
    ]
    for engine in ENGINES:
        verdict = d["serving"][engine]
        lines.append(f"  {engine:<8} {'loads as is' if verdict['loads'] else 'does NOT load as is'}")
        lines += [f"           {f['level']}: {f['message']}" for f in verdict["findings"]]
    click.echo("\n".join(lines))


def _variants(adapter, kinds: dict) -> list[str]:
    config = adapter.config
    variants = []
    checks = [
        (config.get("use_rslora"), "rsLoRA"),
        (config.get("rank_pattern"), "rank_pattern"),
        (config.get("alpha_pattern"), "alpha_pattern"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out (Conv1D)"),
        (config.get("layers_to_transform") is not None, "layers_to_transform"),
        ("embedding" in kinds, "embedding LoRA"),
        ("conv" in kinds, "convolution LoRA"),
        (adapter.extras, "carries full embedding weights"),
        (adapter.saved, f"carries full modules (modules_to_save: {', '.join(adapter.saved_modules)})"),
        (isinstance(config.get("init_lora_weights"), str), f"init_lora_weights={config.get('init_lora_weights')!r}"),
    ]
    for present, name in checks:
        if present:
            variants.append(name)
    return variants


def _ranges(numbers: list[int]) -> str:
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(spans)


@cli.command(short_help="Build a tiny model and adapters locally, merge them with NAN, check the result.")
@_opt("-o", "--output", metavar="DIR", section="Output", help="Folder for the base model, adapters and merge [default: a new temporary folder].")
@_opt("--force", is_flag=True, section="Output", help="Use DIR even if it is not empty.")
@_output_options(json_flag=False)
def demo(output, force, quiet, debug) -> None:
    """Show NAN at work in a few seconds, with no downloads: build a tiny Llama from a config, make three LoRA
    adapters with peft (different ranks and update norms, fixed seed), merge them with NAN coefficients, load the
    merge with peft and compare its logits with the three sources applied together, each scaled by its coefficient."""
    from .demo import run_demo

    report = run_demo(output, force=force, say=lambda message: _note(message, quiet))
    click.echo(_table(["adapter", "rank", "norm", "NAN coefficient"], [[r.name, r.rank, _g(r.norm), _g(r.coefficient)] for r in report.adapters]))
    click.echo(
        f"\nmerged adapter: {report.merged} (rank {report.rank}, loaded with peft's PeftModel.from_pretrained)\n"
        f"max |logits(merged) - logits(sources, scales x coefficients)| = {report.max_abs_difference:.2e}"
        f" (the adapters move the logits by up to {report.max_abs_effect:.2f})\n"
        f"the same merge from the command line (--force: over the demo's): {report.command} --force"
    )


def main() -> None:
    cli.main(prog_name="nan-peft")
