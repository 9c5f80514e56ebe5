"""The commands: each parses (app), calls the library once per step, and renders (render)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from ..spec import ExtractSpec, FoldSpec, MergeSpec, OutputSpec
from ..full.inputs import is_checkpoint
from . import app, render
from .app import cli, opt, output_options, spec_options, stage


@cli.command(short_help="Merge adapters into one, with NAN coefficients by default.")
@click.argument("adapters", nargs=-1, metavar="[ADAPTER]...")
@opt("-o", "--output", metavar="DIR", section="Input and output", help="Folder to write the merged adapter to.")
@opt("--config", "recipe", type=click.Path(dir_okay=False), metavar="RECIPE.yaml", section="Input and output",
     help="YAML recipe with the same option names (adapters, output, combine, ...; paths relative to the current "
          "folder); options given here override it.")
@opt("--force", is_flag=True, section="Input and output", help="Replace OUTPUT if it exists (atomically).")
@spec_options(MergeSpec, OutputSpec, FoldSpec)
@output_options()
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
      nan-peft merge --base BASE math-ft code-ft -o merged   (full fine-tunes of BASE: their task vectors)
    """
    from ..describe import merge_document
    from ..merge import merge_sources
    from ..output import OptionConflict, check_combination, fold_merge, gguf_base_config, write_merge
    from ..record import input_entries, merge_record
    from ..publish import check_output

    recipe_data = app.load_recipe(recipe) if recipe else {}
    paths = list(adapters) or recipe_data.get("adapters") or []
    full = any(is_checkpoint(path) for path in paths)  # full fine-tuned checkpoints among the inputs (nan_peft.full)
    try:
        spec, out, fold = app.build_specs(given, recipe_data)
        out = out if full else check_combination(out, fold)
        if out.vocab is not None and not full:
            raise OptionConflict("--vocab goes with full checkpoints (nan-peft merge --base BASE FT1 FT2 ...)")
    except OptionConflict as error:
        raise click.UsageError(str(error), ctx) from None
    output = output or recipe_data.get("output")
    force = force or bool(recipe_data.get("force"))
    if not paths:
        raise click.UsageError("give at least one ADAPTER (or a --config recipe that lists adapters)", ctx)
    if not output:
        raise click.UsageError("give the output folder with -o / --output (or `output:` in the recipe)", ctx)
    check_output(output, force, "--force")
    if full:
        return _merge_full(ctx, paths, output, force, spec, out, fold, recipe_data, as_json, quiet)

    sources = app.read_sources(paths, quiet, spec.allow_different_bases, spec.allow_duplicates)
    base_config = gguf_base_config(out.base or sources[0].base_model) if out.format == "gguf" else None
    with stage("norms, coefficients, merge", quiet):
        result = merge_sources(sources, spec)
    command = [arg for arg in ctx.obj.get("argv", ["nan-peft", "merge"]) if arg not in app.UNRECORDED_FLAGS]
    if out.format == "gguf" and out.base is None:
        out = dataclasses.replace(out, base=result.adapter.base_model)
    extra = {"device": spec.device, "heads": out.heads, "serve": out.serve}
    record = merge_record(result, input_entries(paths, sources), command, extra, recipe=recipe_data or None)
    if fold.fold_into is not None:
        if fold.device_map and (quiet or not sys.stderr.isatty()):  # transformers' own loading/saving bars
            from transformers.utils.logging import disable_progress_bar

            disable_progress_bar()
        with stage(f"folding into {fold.fold_into}: {output}", quiet):
            written = fold_merge(result, output, fold, record, overwrite=force)
    else:
        with stage(f"writing {output}", quiet):
            done = write_merge(result, output, out, record, overwrite=force, base_config=base_config)
        for message in done.notes:
            app.note(message, quiet)
        written = done.folder
    document = merge_document(result, record, output, sorted(p.name for p in Path(written).iterdir()))
    render.print_json(document) if as_json else click.echo(render.merge_text(document, output))


def _merge_full(ctx, paths, output, force, spec, out, fold, recipe_data, as_json, quiet) -> None:
    """`nan-peft merge --base BASE FT1 FT2 ... -o OUT`: full checkpoints (and adapters) merged as task vectors."""
    from ..full import check_full_options, full_document, merge_checkpoints

    check_full_options(out, fold)
    command = [arg for arg in ctx.obj.get("argv", ["nan-peft", "merge"]) if arg not in app.UNRECORDED_FLAGS]
    with stage(f"task vectors tensor by tensor: norms, coefficients, merge into {output}", quiet):
        done = merge_checkpoints(out.base, paths, output, spec, vocab=out.vocab, overwrite=force, command=command,
                                 recipe=recipe_data or None)
    document = full_document(done, output)
    if as_json:
        return render.print_json(document)
    g = render.g
    rows = [[i["name"], i["kind"], g(i["norm"]), "per tensor" if i["coefficient"] is None else g(i["coefficient"])] for i in document["inputs"]]
    click.echo(render.table(["input", "kind", "norm", "coefficient"], rows))
    click.echo(f"\nmerged checkpoint: {output} ({document['tensors']} tensors, the base's shard layout and dtypes)")


@cli.command(short_help="Norms, cosine similarities and the coefficients each option gives.")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@opt("--allow-different-bases", is_flag=True, section="Input", help="Accept adapters whose configs name different base models.")
@opt("--base", metavar="BASE", section="Input", help="The base model of full fine-tuned inputs: their task vectors are W_k - BASE.")
@opt("--vocab", type=click.Choice(["base", "union"]), section="Input", help="Full checkpoints whose vocabulary differs from the base's "
     "(see merge --vocab).")
@opt("--device", metavar="cpu|cuda|auto", section="Execution", help="Where to compute [default cpu].")
@output_options()
def norms(adapters, allow_different_bases, base, vocab, device, as_json, quiet, debug) -> None:
    """Show each ADAPTER's update norm ||dW||_F, the pairwise cosine similarities of the updates and the
    coefficients NAN (and uniform) would give, computed from r x r Gram matrices. Writes nothing. Full fine-tuned
    checkpoints (with --base) are shown by their task vectors' norms, and every inner product <tau_i, tau_j>."""
    from ..describe import norms_document
    from ..devices import resolve_device
    from ..norms import update_gram

    compute = resolve_device(device or "cpu")
    if any(is_checkpoint(path) for path in adapters):
        from ..full import norms_sources, read_plan, task_vector_gram

        plan = read_plan(base, list(adapters), vocab, allow_different_bases)
        with stage("task vectors tensor by tensor", quiet):
            gram = task_vector_gram(plan, compute)
        document = {**norms_document(norms_sources(plan), adapters, gram), "inner_products": gram.adapter_inner.tolist()}
        return render.print_json(document) if as_json else click.echo(render.norms_text(document))
    if base or vocab:
        raise click.UsageError("--base and --vocab go with full checkpoints among the inputs")
    sources = app.read_sources(list(adapters), quiet, allow_different_bases, allow_duplicates=True)  # shown, not merged
    with stage("norms", quiet):
        gram = update_gram(sources, compute)
    document = norms_document(sources, adapters, gram)
    render.print_json(document) if as_json else click.echo(render.norms_text(document))


@cli.command("inspect", short_help="What an adapter is and which serving engines load it.")
@click.argument("adapter", metavar="ADAPTER")
@opt("--tensor-parallel", "tensor_parallel", type=click.IntRange(min=1), default=1, metavar="N",
     help="The engines' tensor-parallel degree (LoRAX and TGI pad ranks by it) [default 1].")
@opt("--engine-version", "engine_version", metavar="V",
     help="The engine version whose rules apply (vLLM 0.32 and later honour rank/alpha patterns) [default: installed, else the oldest rules].")
@output_options()
def inspect_adapter(adapter, tensor_parallel, engine_version, as_json, quiet, debug) -> None:
    """Describe ADAPTER (base model, ranks, scaling, target modules, layers, size, variants such as rsLoRA) and
    check whether the serving engines (vLLM, SGLang, LoRAX, TGI, TensorRT-LLM, llama.cpp) and peft would serve it
    as peft does, with the flags to pass."""
    from ..describe import adapter_document

    (source,) = app.read_sources([adapter], quiet)
    document = adapter_document(source, adapter, tensor_parallel, engine_version)
    render.print_json(document) if as_json else click.echo(render.adapter_text(document))


@cli.command(short_help="A LoRA adapter from a full fine-tune: best rank-R factors.")
@click.argument("fine_tune", metavar="FT")
@opt("--base", required=True, metavar="BASE", section="Input and output", help="The model FT was fine-tuned from (a folder or Hub id).")
@opt("-o", "--output", required=True, metavar="DIR", section="Input and output", help="Folder to write the adapter to.")
@opt("--force", is_flag=True, section="Input and output", help="Replace OUTPUT if it exists (atomically).")
@spec_options(ExtractSpec)
@output_options()
@click.pass_context
def extract(ctx: click.Context, fine_tune, base, output, force, as_json, quiet, debug, **given) -> None:
    """Write the LoRA adapter of the full fine-tune FT over BASE (transformers safetensors checkpoints, read one
    tensor at a time): at every Linear, Conv1D and Embedding weight, the best rank-R approximation of its task vector
    W_ft - W_base (or, with --energy F, the smallest rank keeping that fraction of ||tau||_F^2), with
    extract_record.json (each module's rank and discarded norm) and a model card.

    \b
    Examples:
      nan-peft extract FT --base BASE -o adapter --rank 16
      nan-peft extract FT --base BASE -o adapter --energy 0.9 --rank 64 --modules self_attn --modules '!k_proj'
    """
    from ..extract import extract_lora, extract_record
    from ..publish import check_output

    spec = ExtractSpec(**{key: value for key, value in given.items() if value not in (None, ())})
    check_output(output, force, "--force")
    with stage(f"extracting {fine_tune}", quiet):
        extraction = extract_lora(fine_tune, base, spec)
    command = [arg for arg in ctx.obj.get("argv", ["nan-peft", "extract"]) if arg not in app.UNRECORDED_FLAGS]
    with stage(f"writing {output}", quiet):
        written = extraction.save_pretrained(output, overwrite=force, command=command)
    record = extract_record(extraction, command)
    if record["left_out"]:
        app.note(f"note: {len(record['left_out'])} tensors the fine-tune changed are not in the adapter (1-D, or excluded); "
                 "extract_record.json lists them with their norms", quiet)
    if as_json:
        render.print_json({"output": output, "files": sorted(p.name for p in Path(written).iterdir()), **record})
        return
    g, worst = render.g, max(record["modules"], key=lambda m: m["relative_discarded"])
    click.echo(f"extracted {len(record['modules'])} modules at rank {record['rank']}: ||tau||_F = {g(record['norm'])}, discarded "
               f"{g(record['discarded'])} ({g(100 * record['relative_discarded'])}%); largest relative discarded "
               f"{g(100 * worst['relative_discarded'])}% ({worst['module']})\nadapter: {output}")


@cli.command(short_help="Build a tiny model and adapters, merge them with NAN, check it.")
@opt("-o", "--output", metavar="DIR", section="Output", help="Folder for the base model, adapters and merge [default: a new temporary folder].")
@opt("--force", is_flag=True, section="Output", help="Use DIR even if it is not empty.")
@output_options(json_flag=False)
def demo(output, force, quiet, debug) -> None:
    """Show NAN at work in a few seconds, with no downloads: build a tiny Llama from a config, make three LoRA
    adapters with peft (different ranks and update norms, fixed seed), merge them with NAN coefficients, load the
    merge with peft and compare its logits with the three sources applied together, each scaled by its coefficient."""
    from ..demo import run_demo

    report = run_demo(output, force=force, say=lambda message: app.note(message, quiet))
    g = render.g
    click.echo(render.table(["adapter", "rank", "norm", "NAN coefficient"], [[r.name, r.rank, g(r.norm), g(r.coefficient)] for r in report.adapters]))
    click.echo(
        f"\nmerged adapter: {report.merged} (rank {report.rank}, loaded with peft's PeftModel.from_pretrained)\n"
        f"max |logits(merged) - logits(sources, scales x coefficients)| = {report.max_abs_difference:.2e}"
        f" (the adapters move the logits by up to {report.max_abs_effect:.2f})\n"
        f"the same merge from the command line (--force: over the demo's): {report.command} --force"
    )

