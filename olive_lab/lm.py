"""Language-model helpers shared by quantize, finetune, optimize and evaluate: chat formatting, batching, loss."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from olive_lab.device import torch_dtype
from olive_lab.errors import StageError

IGNORE = -100


def load_tokenizer(model_dir: Path | str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path | str, device: str = "cpu", dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise StageError(f"{model_dir}: no Hugging Face model here (config.json missing); run the stage that makes it")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype))
    return model.to(device).eval()


def prompt_text(tokenizer, prompt: str, system: str | None = None) -> str:
    """The model's own chat template, ending where the assistant's reply starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt+response and labels that score the response (and its end token) only."""
    head = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False).input_ids
    tail = tokenizer(response, add_special_tokens=False).input_ids + [end_token(tokenizer)]
    ids = (head + tail)[:max_len]
    labels = ([IGNORE] * len(head) + tail)[:max_len]
    return ids, labels


def end_token(tokenizer) -> int:
    """The token that closes a chat turn: the tokenizer's eos, which the base stage sets from model.eos_token."""
    return tokenizer.eos_token_id


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> Iterator[dict]:
    import torch

    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_nll(model, batch: dict, grad: bool = False):
    """Summed next-token negative log-likelihood over labelled tokens, and their count.

    The vocabulary projection runs only on the positions that are scored: for a 49k vocabulary that skips the
    [batch, length, vocab] logits of prompt and padding tokens, the biggest tensor of a CPU training step.
    With grad=True the sum stays a tensor to back-propagate through; otherwise it is a float.
    """
    import torch

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = causal.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = causal.get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    return (loss if grad else float(loss)), int(keep.sum())


def eval_nll(model, tokenizer, rows: list[dict], max_len: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed response-token loss of `rows` under the chat template, and the number of tokens scored."""
    import torch

    examples = [encode_example(tokenizer, r["prompt"], r["response"], max_len) for r in rows]
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches(examples, batch_size, tokenizer.pad_token_id):
            nll, n = token_nll(model, batch)
            total, count = total + nll, count + n
    return total, count


def eval_loss(model, tokenizer, rows: list[dict], max_len: int, batch_size: int = 16) -> float:
    """Mean response-token loss of `rows` under the chat template (perplexity = exp of it)."""
    total, count = eval_nll(model, tokenizer, rows, max_len, batch_size)
    if count == 0:
        raise StageError("no response tokens to evaluate (empty eval split or max_seq_len too small)")
    return total / count


def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy replies for many prompts, batched with left padding (much faster than one at a time on CPU)."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=[end_token(tokenizer), tokenizer.eos_token_id],
                    pad_token_id=tokenizer.pad_token_id,
                )
            replies += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]
