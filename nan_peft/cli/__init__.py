"""The `nan-peft` command line: merge, norms, inspect, demo. A thin edge over the library: parse (app: click
plumbing, options generated from nan_peft.spec, recipes), call (commands), format (render).

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
                  "truncation": "none" | "gram" | "qr" | "dense" | "randomized",  # how svd truncated (none: cat)
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

With full fine-tuned checkpoints among the inputs (``--base BASE``), ``nan-peft norms --json`` has the same keys
(an input's "ranks" is [] for a full checkpoint, "modules" counts the tensors it has a task vector in, "modules"
lists tensors) and "inner_products": [[float]] (K x K, every <tau_i, tau_j>); ``nan-peft merge --json`` prints::

    {"inputs": [{"name": str, "path": str, "kind": "full" | "lora",
                 "norm": float,                  # ||tau_k|| over the whole model
                 "coefficient": float | null}],  # null with granularity "module"
     "inner_products": [[float]], "coefficients": {...}, "options": {...},  # as merge_record.json has them
     "tensors": int,                     # float tensors merged
     "output": str, "files": [str]}

``nan-peft extract --json`` (the extract_record.json written, with "output" and "files")::

    {"output": str, "files": [str], "format": 1, "nan_peft_version": str, "command": [str],
     "fine_tune": {"path": str, "hub"?: {...}}, "base": {"path": str, "hub"?: {...}},
     "options": {"rank", "energy", "modules": [str], "truncation", "oversample", "power_iterations", "sketch_seed",
                 "dtype", "device"},
     "rank": int,                        # the adapter's one global rank (module ranks zero-padded to it)
     "norm": float, "discarded": float, "relative_discarded": float,  # over the tensors extracted, each counted once
     "modules": [{"module": str, "tensor": str,  # the checkpoint tensor it comes from (a tied one feeds two modules)
                  "rank": int, "norm": float,    # ||tau||_F, tau = W_ft - W_base
                  "discarded": float,            # ||tau - B A||_F of the factors written
                  "relative_discarded": float, "truncation": "dense" | "randomized"}],
     "left_out": [{"tensor": str, "norm": float, "why": str}],  # changed tensors the adapter does not carry
     "unchanged": int}                   # weights extracted from that equal the base's (no module written)

``nan-peft inspect --json``::

    {"name", "path", "base_model": str | null, "task_type": str | null, "format": "safetensors" | "bin",
     "r": int, "lora_alpha": float, "ranks": [int], "scaling": {"rule": str, "values": [float]},
     "rank_pattern": {}, "alpha_pattern": {}, "target_modules": [str], "modules": int, "layers": [int],
     "kinds": {kind: int}, "dtypes": [str], "parameters": int, "size_bytes": int, "variants": [str],
     "serving": {engine: {"loads": bool, "findings": [{"level": "error" | "warning" | "info", "message": str}]}}}
"""

from __future__ import annotations

from . import commands  # registers the commands on the group
from .app import cli, main

__all__ = ["cli", "commands", "main"]
