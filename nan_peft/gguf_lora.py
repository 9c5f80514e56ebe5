"""Write a LoRA adapter as the GGUF LoRA file llama.cpp (and Ollama's ADAPTER) loads, without llama.cpp's scripts.

The file is what llama.cpp's `convert_lora_to_gguf.py --outtype f32` (its default) writes for the same adapter in
nan-peft's servable form (one rank, lora_alpha = r, scales baked into B), for the architectures of _ARCHITECTURES
only: for each adapted module, `<gguf name>.lora_a` and `<gguf name>.lora_b` float32 tensors, with the rows of
B permuted for q_proj / k_proj where llama.cpp permutes the base weights, and the metadata llama.cpp checks when
it loads an adapter. Each rule below names the llama.cpp file it comes from (ggml-org/llama.cpp, read in 2026):

- convert_lora_to_gguf.py: the LoRA converter (pairs A and B per base tensor, runs the base model's
  modify_tensors on the pair, names them `.lora_a` / `.lora_b`, writes general.type, adapter.type,
  adapter.lora.alpha);
- convert_hf_to_gguf.py (LlamaModel, TextModel, ModelBase; conversion/qwen.py for Qwen2Model): tensor names
  through gguf's TensorNameMap, the q/k permutation, the output type;
- src/llama-adapter.cpp, src/llama-adapter.h, src/llama-graph.cpp, src/llama-model.cpp: what the loader checks
  and how the update is applied (scale = alpha / rank, the embedding's flipped A).

`gguf` (llama.cpp's gguf-py on PyPI) is imported only when a file is written: `pip install nan-peft[gguf]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import NanPeftError
from .lora import FACTOR_KEYS, KEY_PREFIX, LoraAdapter
from .publish import check_file_names, publish_folder, write_files
from .writer import adapter_config, adapter_state_dict, servable_rank

GGUF_NAME = "adapter_model.gguf"
"""The file written into the output folder (llama.cpp's `--lora FILE`, Ollama's `ADAPTER FILE`)."""

# Hugging Face architecture (config.json "architectures"[0]) -> (gguf.MODEL_ARCH member, whether llama.cpp permutes
# the rows of q_proj / k_proj). convert_hf_to_gguf.py registers LlamaForCausalLM and MistralForCausalLM on
# LlamaModel (model_arch = MODEL_ARCH.LLAMA, undo_permute = True) and Qwen2ForCausalLM on Qwen2Model
# (model_arch = MODEL_ARCH.QWEN2, no permutation: its modify_tensors only maps names). Other architectures have
# their own modify_tensors (fused or split tensors, other permutations), so they are refused rather than guessed.
_ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}


def read_base_config(base: str | os.PathLike) -> dict:
    """The base model's config.json as a dict, from a folder holding it (what convert_lora_to_gguf.py's --base
    takes: only the config is needed, not the weights) or from the file itself; nothing is downloaded."""
    path = Path(base)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanPeftError(f"{base}: no config.json there; --base takes the base model's folder (only its config.json is read)") from None
    except (OSError, ValueError) as error:
        raise NanPeftError(f"{file}: not a readable config.json ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise NanPeftError(f"{file}: not a model config (a JSON object)")
    return config


def gguf_architecture(base_config: Mapping) -> tuple[str, bool]:
    """The (gguf.MODEL_ARCH member name, permutes q/k) llama.cpp converts the base model with; refused in one line
    for an architecture this writer does not handle."""
    hparams = _hparams(base_config)
    names = hparams.get("architectures") or []
    if not names:
        raise NanPeftError("the base model's config.json names no architectures; llama.cpp needs them to convert a LoRA")
    # convert_lora_to_gguf.py: hparams.get("text_config", {}).get("architectures", hparams["architectures"])[0]
    name = names[0]
    if name not in _ARCHITECTURES:
        raise NanPeftError(
            f"--format gguf does not handle base architecture {name} (only {', '.join(_ARCHITECTURES)}); "
            "write the peft adapter and convert it with llama.cpp's convert_lora_to_gguf.py"
        )
    return _ARCHITECTURES[name]


def gguf_tensors(adapter: LoraAdapter, base_config: Mapping, rank: int | None = None) -> dict[str, torch.Tensor]:
    """{gguf tensor name: float32 tensor} as llama.cpp's converter names and lays out the adapter's factors,
    in nan-peft's servable form (writer.adapter_state_dict: one rank, each module's scale baked into B).

    A tensor (rows, cols) here is what gguf writes with ggml dims ne = [cols, rows]: lora_a (r, in) and lora_b
    (out, r), so that llama-adapter.cpp's checks hold (base ne[0] == a.ne[0], base ne[1] == b.ne[1],
    a.ne[1] == b.ne[0]), and the rank llama.cpp divides alpha by is b.ne[0] = r (llama-adapter.h, get_scale)."""
    import gguf

    arch_name, permutes = gguf_architecture(base_config)
    hparams = _hparams(base_config)
    _refuse_untakeable(adapter, hparams)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    # convert_hf_to_gguf.py, TextModel.__init__: block_count from these keys, tensor_map = gguf.get_tensor_name_map
    blocks = _find(hparams, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    names = gguf.get_tensor_name_map(arch, blocks)
    state = adapter_state_dict(adapter, rank)
    tensors = {}
    for path in sorted(adapter.modules):
        module = adapter.modules[path]
        a_key, b_key = FACTOR_KEYS[module.kind]
        A = state[f"{KEY_PREFIX}{path}.{a_key}"].to(torch.float32)
        B = state[f"{KEY_PREFIX}{path}.{b_key}"].to(torch.float32)
        # convert_lora_to_gguf.py, get_base_tensor_name: the pair is named after the base weight "<path>.weight";
        # convert_hf_to_gguf.py, ModelBase.map_tensor_name: TensorNameMap.get_name(try_suffixes=(".weight", ".bias"))
        name = names.get_name(f"{path}.weight", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise NanPeftError(f"module {path} has no tensor in llama.cpp's {arch_name.lower()} model; llama.cpp cannot apply its LoRA")
        if permutes and path.endswith(("q_proj", "k_proj")):
            B = _permute_rows(B, path, hparams)
        if module.kind == "embedding":
            # convert_lora_to_gguf.py: "we only need to transpose token_embd.lora_a, see llm_build_inp_embd()";
            # llama-graph.cpp takes the rows of a (ne [r, n_vocab]) for the tokens, then multiplies by b.
            if name != "token_embd.weight":
                raise NanPeftError(f"embedding LoRA of {path} maps to {name}; llama.cpp applies an embedding LoRA to token_embd only")
            A = A.T
        tensors[f"{name}.lora_a"] = A.contiguous()
        tensors[f"{name}.lora_b"] = B.contiguous()
    return tensors


def write_gguf_lora(
    adapter: LoraAdapter,
    base_config: Mapping,
    folder: str | os.PathLike,
    rank: int | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
    protected: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write `adapter` as a GGUF LoRA file, folder/adapter_model.gguf, for llama.cpp and Ollama, published
    atomically with `extra_files` beside it (writer.publish_folder: a temporary sibling renamed into place; never
    over an existing folder without `overwrite`, nor into a `protected` input). Returns the path of the file.

    base_config is the base model's config.json as a dict: its architecture picks llama.cpp's tensor names, its
    head counts the q/k row permutation, tie_word_embeddings what llama.cpp can take. Refused in one line: an
    architecture outside _ARCHITECTURES, trained full modules (modules_to_save), conv or
    Conv1D (fan_in_fan_out) LoRA, lm_head or embedding LoRA with tied embeddings, modules llama.cpp has no tensor
    for, q/k factors whose shape does not fit the base config. Full weights peft carries beside an embedding's or
    lm_head's factors (adapter.extras) are left out, as convert_lora_to_gguf.py leaves them out: they are copies
    of the base weights, and a resized vocabulary shows as a shape mismatch when llama.cpp loads the file."""
    check_file_names(extra_files or {}, reserved=(GGUF_NAME,))
    rank = servable_rank(adapter, rank)
    tensors = gguf_tensors(adapter, base_config, rank)
    alpha = float(adapter_config(adapter, rank)["lora_alpha"])  # = rank: llama.cpp's scale alpha / rank is 1

    def write(tmp: Path) -> None:
        _write_file(tmp / GGUF_NAME, tensors, base_config, alpha, adapter.name)
        write_files(tmp, extra_files or {})

    return publish_folder(folder, write, overwrite, protected) / GGUF_NAME


def _write_file(file: Path, tensors: Mapping[str, torch.Tensor], base_config: Mapping, alpha: float, name: str) -> None:
    import gguf

    arch_name, _ = gguf_architecture(base_config)
    # convert_hf_to_gguf.py, ModelBase.__init__: GGUFWriter(arch=MODEL_ARCH_NAMES[model_arch]) writes
    # general.architecture, which llama-adapter.cpp requires to equal the base model's ("model arch and LoRA arch
    # mismatch"); little endian, as the converter's default.
    writer = gguf.GGUFWriter(file, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
    # convert_lora_to_gguf.py, LoraModel.set_type / set_gguf_parameters: the keys llama-adapter.cpp checks
    writer.add_type(gguf.GGUFType.ADAPTER)  # general.type = "adapter"
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")  # adapter.type = "lora"
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)  # adapter.lora.alpha
    writer.add_name(name)  # general.name (ModelBase.prepare_metadata writes one too; informational)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # ModelBase.prepare_metadata
    for key, tensor in tensors.items():
        # convert_hf_to_gguf.py, ModelBase.prepare_tensors: ".lora_a" / ".lora_b" tensors take the output type,
        # float32 by default (--outtype f32); the writer stores the numpy shape reversed as ggml's ne.
        writer.add_tensor(key, tensor.numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hparams(base_config: Mapping) -> dict:
    """The base config as convert_hf_to_gguf.py's TextModel sees it: text_config's keys moved to the top level."""
    config = dict(base_config)
    if isinstance(config.get("text_config"), Mapping):
        config = {**config, **config["text_config"]}
    return config


def _find(hparams: Mapping, keys: Sequence[str]):
    """convert_hf_to_gguf.py, ModelBase.find_hparam: the first of `keys` present."""
    for key in keys:
        if key in hparams:
            return hparams[key]
    raise NanPeftError(f"the base model's config.json has none of {', '.join(keys)}; llama.cpp needs it to convert the LoRA")


def _tied(hparams: Mapping) -> bool:
    # transformers' LlamaConfig, MistralConfig and Qwen2Config default tie_word_embeddings to False; the converter
    # reads the config through AutoConfig, which fills in that default.
    return bool(hparams.get("tie_word_embeddings", False))


def _refuse_untakeable(adapter: LoraAdapter, hparams: Mapping) -> None:
    # Full weights carried beside the factors (adapter.extras: peft's copy of a targeted embedding / lm_head
    # weight, "<path>.base_layer.weight") are left out, as convert_lora_to_gguf.py skips ".base_layer.weight";
    # trained full modules (modules_to_save) replace base weights, which a LoRA file cannot do: llama-adapter.cpp
    # throws "has unexpected suffix" for tensors other than .lora_a / .lora_b / _norm.weight.
    if adapter.saved:
        full = sorted(adapter.saved)
        raise NanPeftError(
            f"llama.cpp takes LoRA factors only, and the adapter carries {len(full)} trained full tensor(s) "
            f"({', '.join(full[:2])}{' ...' if len(full) > 2 else ''}); merge with --heads drop to leave them out"
        )
    tied = _tied(hparams)
    for path, module in sorted(adapter.modules.items()):
        if module.kind == "conv" or module.fan_in_fan_out:
            raise NanPeftError(f"module {path} is a {'Conv' if module.kind == 'conv' else 'Conv1D'} LoRA, which --format gguf does not write")
        if tied and path == "lm_head":
            # convert_lora_to_gguf.py refuses lm_head LoRA where the base model has no lm_head; with tied embeddings
            # the base GGUF has no output.weight (llama-model.cpp duplicates token_embd), so llama-adapter.cpp throws
            # "does not exist in base model".
            raise NanPeftError("the adapter has a LoRA on lm_head, and the base model ties its embeddings: llama.cpp has no separate output tensor to apply it to")
        if tied and module.kind == "embedding":
            # llama-model.cpp: with tied embeddings the output projection is the token_embd.weight tensor itself
            # (TENSOR_DUPLICATED), and llama-graph.cpp's build_lora_mm finds LoRAs by tensor name, so the embedding's
            # LoRA would also reach the output projection, which peft never adapts.
            raise NanPeftError(f"the adapter has an embedding LoRA ({path}), and the base model ties its embeddings: llama.cpp would apply it to the output projection too")


def _permute_rows(B: torch.Tensor, path: str, hparams: Mapping) -> torch.Tensor:
    """convert_hf_to_gguf.py, LlamaModel.modify_tensors and LlamaModel.permute, applied to B only: llama.cpp stores
    q_proj / k_proj with the rows of each head interleaved (HF's rotate-half layout back to Meta's pairs), and
    convert_lora_to_gguf.py's LoraTorchTensor carries a row permutation of A @ B's product onto B alone (A unchanged).

    permute(w, n_head, n_head_kv): n_head = n_head_kv when they differ (k_proj), then
    w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)."""
    n_head = _find(hparams, ("n_heads", "num_attention_heads"))
    # LlamaModel.modify_tensors reads n_kv_heads / num_key_value_heads; transformers' LlamaConfig fills the
    # latter with num_attention_heads when a config.json leaves it out, and the converter reads it through AutoConfig.
    try:
        n_kv_head = _find(hparams, ("n_kv_heads", "num_key_value_heads"))
    except NanPeftError:
        n_kv_head = None
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    heads = n_head if path.endswith("q_proj") else n_kv_head
    head_dim = hparams.get("head_dim") or _find(hparams, ("hidden_size",)) // n_head
    if B.shape[0] != heads * head_dim or B.shape[0] % (2 * heads):
        raise NanPeftError(
            f"module {path} has {B.shape[0]} output rows, but the base config gives {heads} heads of {head_dim}: "
            "is it the adapter's base model?"
        )
    return B.reshape(heads, 2, B.shape[0] // heads // 2, B.shape[1]).swapaxes(1, 2).reshape(B.shape)
