"""Stage optimize on the tiny model: int4 grid exactness, multi-LoRA inputs/adapters, agreement with torch, bad inputs.

The tiny model is first snapped to the int4 grid (as the quantize stage leaves SmolLM2), so ONNX and torch compute
with the same weights and every difference left is the export's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from olive_lab.errors import StageError
from olive_lab.lm import load_model, load_tokenizer, prompt_text
from olive_lab.lora import random_adapter
from olive_lab.onnx.check import OnnxLM, agreement, int4_grid_error
from olive_lab.onnx.export import build_onnx
from olive_lab.onnx.lora import RESIDENT_DATA, SWITCH, peft_to_inputs, read_adapter
from tests.helpers import default_params, error_lines, run_stage, write_params

GROUP = 32  # conf/model/tiny.yaml group_size
TASKS = ("travel", "trip_json")
ROWS = [
    {
        "prompt": "What should I pack for a week in Iceland in March?",
        "response": "Layers: thermal base, fleece, a waterproof shell, warm hat, gloves and boots with grip.",
    },
    {
        "prompt": "Is the Paris Museum Pass worth it?",
        "response": "Yes if you visit three or more museums in two days; it also lets you skip ticket lines.",
    },
    {
        "prompt": "Best time to see cherry blossoms in Kyoto?",
        "response": "Late March to early April; the exact week moves with the spring weather.",
    },
    {
        "prompt": "How do I get from Rome airport to the city?",
        "response": "The Leonardo Express train runs every 15 minutes to Termini and takes about 32 minutes.",
    },
    {
        "prompt": "Give me a one-day plan for Lisbon.",
        "response": "Morning in Alfama, tram 28 to Baixa, lunch in Chiado, sunset at Miradouro da Senhora do Monte.",
    },
    {
        "prompt": "Do I need a visa for Japan as an EU citizen?",
        "response": "No, EU citizens can stay up to 90 days visa-free for tourism.",
    },
    {
        "prompt": "Cheap ways to travel around Europe?",
        "response": "Night buses, regional trains booked early, budget airlines with hand luggage only, and rail passes.",
    },
    {
        "prompt": "Trip JSON for two days in Prague",
        "response": '{"city": "Prague", "days": [{"day": 1, "plan": ["Old Town", "Charles Bridge"]}, {"day": 2, "plan": ["Castle"]}]}',
    },
    {
        "prompt": "What is a good tip in New York restaurants?",
        "response": "Between 18 and 22 percent of the bill before tax is usual for table service.",
    },
    {
        "prompt": "How early should I arrive for an international flight?",
        "response": "Three hours before departure leaves time for check-in, security and passport control.",
    },
    {
        "prompt": "Trip JSON for a weekend in Berlin",
        "response": '{"city": "Berlin", "days": [{"day": 1, "plan": ["Museum Island"]}, {"day": 2, "plan": ["East Side Gallery"]}]}',
    },
]


def snap_to_int4_grid(weight, group: int):
    """Asymmetric min/max round-to-nearest per `group` inputs (what the quantize stage leaves weights on)."""
    import torch

    rows, cols = weight.shape
    x = weight.reshape(rows, cols // group, group)
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-12)
    zero = torch.round(-low / scale).clamp(0, 15)
    return ((torch.clamp(torch.round(x / scale + zero), 0, 15) - zero) * scale).reshape(rows, cols)


@pytest.fixture(scope="module")
def grid_base(tiny_base, tmp_path_factory) -> Path:
    import torch

    model = load_model(tiny_base)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.weight.copy_(snap_to_int4_grid(module.weight, GROUP))
    out = tmp_path_factory.mktemp("grid") / "quantized"
    model.save_pretrained(out)
    load_tokenizer(tiny_base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def grid_adapters(grid_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grid_adapters")
    return {name: random_adapter(grid_base, root / name, seed=10 + i) for i, name in enumerate(TASKS)}


@pytest.fixture(scope="module")
def built(grid_base, grid_adapters, tmp_path_factory) -> dict[str, Path]:
    """int4 multi-LoRA (both layouts), the same without adapters (plain), fp32 multi-LoRA, and int4 multi-LoRA built
    for CUDA (fp16 inputs/outputs; its kernels also run on the CPU provider), from the grid model."""
    root = tmp_path_factory.mktemp("built")
    int4 = dict(precision="int4", block_size=GROUP, accuracy_level=4, execution_provider="cpu")
    build_onnx(grid_base, root / "lora", grid_adapters, **int4)
    build_onnx(grid_base, root / "switch", grid_adapters, **int4, lora_layout="switch")
    build_onnx(grid_base, root / "resident", grid_adapters, **int4, lora_layout="resident")
    build_onnx(grid_base, root / "plain", {}, **int4)
    build_onnx(grid_base, root / "cuda", grid_adapters, **{**int4, "execution_provider": "cuda"})
    build_onnx(
        grid_base,
        root / "cuda_resident",
        grid_adapters,
        **{**int4, "execution_provider": "cuda"},
        lora_layout="resident",
    )
    build_onnx(
        grid_base,
        root / "fp32",
        grid_adapters,
        precision="fp32",
        execution_provider="cpu",
        block_size=GROUP,
        accuracy_level=4,
    )
    return {name: root / name for name in ("lora", "switch", "resident", "plain", "fp32", "cuda", "cuda_resident")}


def lora_inputs(model_dir: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return {i.name for i in graph.input if ".lora_" in i.name}


def greedy(model, tokens: list[int], steps: int, adapters=None, name=None) -> tuple[list[int], np.ndarray]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(tokens) + steps, min_length=len(tokens) + steps)
    gen = og.Generator(model, params)
    if name:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(tokens)
    first_logits = gen.get_logits()[0, -1].copy()
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out, first_logits


def prompt_ids(model_dir: Path, prompt: str) -> list[int]:
    tok = load_tokenizer(model_dir)
    return tok(prompt_text(tok, prompt), add_special_tokens=False).input_ids


# --- layout and names -------------------------------------------------------------------------------------------


def test_tiny_onnx_fixture_layout(tiny_onnx):
    import onnxruntime_genai as og

    assert (tiny_onnx / "model" / "genai_config.json").exists()
    assert sorted(p.name for p in (tiny_onnx / "adapters").iterdir()) == [f"{t}.onnx_adapter" for t in sorted(TASKS)]
    model = og.Model(str(tiny_onnx / "model"))
    adapters = og.Adapters(model)
    for task in TASKS:
        adapters.load(str(tiny_onnx / "adapters" / f"{task}.onnx_adapter"), task)


def test_agreement_onnx_loss_is_what_evaluate_would_measure(built, grid_base, torch_models):
    """evaluate takes the ONNX losses of metrics/optimize.json instead of recomputing them: same number both ways."""
    from olive_lab.onnx.check import onnx_loss, pooled

    tokenizer = load_tokenizer(grid_base)
    onnx_lm = OnnxLM(built["lora"] / "model")
    halves = {"a": ROWS[: len(ROWS) // 2], "b": ROWS[len(ROWS) // 2 :]}
    for task, model in torch_models.items():
        weights = read_adapter(built["lora"] / "adapters" / f"{task}.onnx_adapter")
        parts = {
            name: agreement(onnx_lm, model, tokenizer, rows, 256, adapter=weights) for name, rows in halves.items()
        }
        whole = agreement(onnx_lm, model, tokenizer, ROWS, 256, adapter=weights)
        pool = pooled(parts)
        for name, rows in halves.items():
            assert pool["by_task"][name] == {"loss_onnx": parts[name]["loss_onnx"], "rows": len(rows)}
            assert onnx_loss(onnx_lm, tokenizer, rows, 256, weights) == pytest.approx(
                parts[name]["loss_onnx"], abs=1e-4
            )
        # pooling the halves gives the agreement over all rows
        for key in ("argmax_agreement", "loss_onnx", "loss_torch", "tokens", "rows"):
            assert pool[key] == pytest.approx(whole[key], abs=2e-4), key
        assert pool["logit_max_rel"] == whole["logit_max_rel"]


@pytest.mark.parametrize("variant", ["lora", "switch"])
def test_adapter_tensors_are_exactly_the_lora_inputs(built, variant):
    import onnx

    model_dir = built[variant] / "model"
    graph_inputs = {i.name for i in onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph.input}
    lora = lora_inputs(model_dir)
    # 2 layers x (qkv, o, gate_up, down) x (A, B)
    assert len(lora) == 16
    expected = lora | ({SWITCH} if variant == "switch" else set())
    assert expected <= graph_inputs
    for task in TASKS:
        names = set(read_adapter(built[variant] / "adapters" / f"{task}.onnx_adapter"))
        assert names == expected


def test_resident_adapters_are_in_the_model_and_the_files_hold_masks(built):
    import onnx

    model_dir = built["resident"] / "model"
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    masks = {i.name for i in graph.input if i.name.startswith("lora_mask.")}
    assert lora_inputs(model_dir) == set() and masks
    assert (model_dir / RESIDENT_DATA).stat().st_size > 0
    files = {task: read_adapter(built["resident"] / "adapters" / f"{task}.onnx_adapter") for task in TASKS}
    assert all(set(values) == masks for values in files.values())
    # each adapter's masks pick its own block: disjoint, non-empty
    for mask in masks:
        picks = [files[task][mask] for task in TASKS]
        assert all(p.sum() > 0 for p in picks) and not (picks[0] * picks[1]).any()


def test_resident_layout_computes_what_the_branches_do(built, grid_base):
    """The concatenated, padded weights are the same numbers: with each adapter, and with none, the logits agree."""
    branches, resident = OnnxLM(built["lora"] / "model"), OnnxLM(built["resident"] / "model")
    ids = prompt_ids(grid_base, ROWS[2]["prompt"])
    np.testing.assert_array_equal(resident.logits(ids), branches.logits(ids))
    for task in TASKS:
        weights = read_adapter(built["lora"] / "adapters" / f"{task}.onnx_adapter")
        masks = read_adapter(built["resident"] / "adapters" / f"{task}.onnx_adapter")
        np.testing.assert_allclose(resident.logits(ids, masks), branches.logits(ids, weights), rtol=0, atol=1e-5)
    other = read_adapter(built["resident"] / "adapters" / f"{TASKS[0]}.onnx_adapter")
    assert np.abs(resident.logits(ids, other) - branches.logits(ids, weights)).max() > 1e-2  # weights: TASKS[-1]


def test_auto_layout_is_resident_on_cuda_only():
    from olive_lab.onnx.lora import resolve_layout

    assert resolve_layout("auto", "cuda") == "resident" and resolve_layout("auto", "cpu") == "branches"
    assert resolve_layout("switch", "cuda") == "switch"


def test_plain_model_has_no_lora_inputs(built):
    assert lora_inputs(built["plain"] / "model") == set()
    assert list((built["plain"] / "adapters").iterdir()) == []


# --- exactness of the int4 export -------------------------------------------------------------------------------


def test_int4_weights_dequantize_to_the_hf_grid(built, grid_base, tiny_base):
    onnx_file = built["lora"] / "model" / "model.onnx"
    on_grid = int4_grid_error(onnx_file, grid_base)
    assert on_grid["matmuls"] == 8  # 2 layers x (qkv, o, gate_up, down)
    assert on_grid["max_rel"] < 1e-6, on_grid
    # The same check against the un-snapped weights sees int4 rounding (~1/30 of the range): the check can fail.
    off_grid = int4_grid_error(onnx_file, tiny_base)
    assert off_grid["max_rel"] > 1e-3, off_grid


# --- no adapter = the plain model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "switch", "resident"])
def test_no_adapter_gives_the_plain_models_greedy_output(built, grid_base, variant):
    import onnxruntime_genai as og

    plain, lora = og.Model(str(built["plain"] / "model")), og.Model(str(built[variant] / "model"))
    for row in ROWS[:3]:
        ids = prompt_ids(grid_base, row["prompt"])
        plain_tokens, plain_logits = greedy(plain, ids, 12)
        lora_tokens, lora_logits = greedy(lora, ids, 12)
        assert lora_tokens == plain_tokens
        # the rank-0 branch adds exact zeros; the switch runs the plain graph itself
        np.testing.assert_array_equal(lora_logits, plain_logits)


# --- agreement with torch (base + PEFT) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_models(grid_base, grid_adapters):
    from peft import PeftModel

    return {
        task: PeftModel.from_pretrained(load_model(grid_base), str(path)).eval() for task, path in grid_adapters.items()
    }


# int4 with accuracy_level 4 quantizes activations to int8 per block inside MatMulNBits: each carries a rounding error
# of up to 1/254 of its block's largest value (RMS ~0.6 % of a typical activation); about 8 such matmuls in a row add
# up in quadrature to ~2 % of the logits' spread at most (0.3-0.4 % seen). The largest single deviation over
# ~10^6 logits sits far out in that error's tail (3-9 % seen), so it gets a loose bound that still catches a missing
# or wrong adapter tensor (the random adapters move logits by more than half their spread). fp32 is exact up to
# summation order (1e-6 seen).
LOGIT_TOL = {"lora": {"rms": 0.02, "max": 0.25}, "fp32": {"rms": 1e-4, "max": 1e-3}}
LOGIT_TOL["switch"] = LOGIT_TOL["resident"] = LOGIT_TOL["lora"]
LOGIT_TOL["cuda"] = {"rms": 0.04, "max": 0.3}  # fp16 activations on top of the int4 error (SmolLM2: 0.026 / 0.20)
LOGIT_TOL["cuda_resident"] = LOGIT_TOL["cuda"]


@pytest.mark.parametrize("variant", ["lora", "switch", "resident", "fp32", "cuda", "cuda_resident"])
def test_adapter_logits_agree_with_torch(built, grid_base, torch_models, variant):
    tokenizer = load_tokenizer(grid_base)
    onnx_lm = OnnxLM(built[variant] / "model")
    for task, model in torch_models.items():
        weights = read_adapter(built[variant] / "adapters" / f"{task}.onnx_adapter")
        result = agreement(onnx_lm, model, tokenizer, ROWS, 256, adapter=weights)
        assert len(ROWS) >= 10 and result["tokens"] > 200
        assert result["logit_rms_rel"] < LOGIT_TOL[variant]["rms"], (task, result)
        assert result["logit_max_rel"] < LOGIT_TOL[variant]["max"], (task, result)
        assert result["argmax_agreement"] >= 0.95, (task, result)
        assert abs(result["loss_ratio"] - 1) <= 0.02, (task, result)


@pytest.mark.parametrize("variant", ["lora", "switch", "resident"])
def test_og_adapter_path_gives_the_checked_logits(built, grid_base, variant):
    """ORT GenAI with og.Adapters computes what the session check above compares with torch."""
    import onnxruntime_genai as og

    model = og.Model(str(built[variant] / "model"))
    adapters = og.Adapters(model)
    onnx_lm = OnnxLM(built[variant] / "model")
    for task in TASKS:
        path = built[variant] / "adapters" / f"{task}.onnx_adapter"
        adapters.load(str(path), task)
        # a prompt that ends in the assistant header: ORT GenAI returns the last non-pad position's logits, and
        # this model's pad token is <|im_end|>
        ids = prompt_ids(grid_base, ROWS[1]["prompt"])
        _, og_logits = greedy(model, ids, 1, adapters, task)
        np.testing.assert_allclose(og_logits, onnx_lm.logits(ids, read_adapter(path))[-1], atol=1e-5)


def test_two_adapters_give_different_outputs(built, grid_base):
    import onnxruntime_genai as og

    model = og.Model(str(built["lora"] / "model"))
    adapters = og.Adapters(model)
    for task in TASKS:
        adapters.load(str(built["lora"] / "adapters" / f"{task}.onnx_adapter"), task)
    ids = prompt_ids(grid_base, ROWS[0]["prompt"])
    outputs = {task: greedy(model, ids, 8, adapters, task) for task in TASKS}
    none_tokens, none_logits = greedy(model, ids, 8)
    a, b = (outputs[t] for t in TASKS)
    assert a[0] != b[0]
    assert np.abs(a[1] - b[1]).max() > 0.1
    assert np.abs(a[1] - none_logits).max() > 0.1


# --- conversion refuses what it cannot reproduce ---------------------------------------------------------------------


def _slots(built) -> list:
    from olive_lab.onnx.lora import LoraSlot

    cfg = json.loads((built["lora"] / "model" / "genai_config.json").read_text())["model"]["decoder"]
    hidden = cfg["hidden_size"]
    return [LoraSlot(0, "model.layers.0.attn.o_proj", ("o_proj",), (hidden,), hidden, "float32")]


def test_dora_adapter_is_refused(grid_adapters, tmp_path, built):
    folder = tmp_path / "dora"
    shutil.copytree(grid_adapters["travel"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(StageError, match="use_dora"):
        peft_to_inputs(folder, _slots(built))


def test_adapter_for_another_model_is_refused(grid_adapters, built):
    # slots of layer 0 only: the adapter's layer-1 tensors have nowhere to go
    with pytest.raises(StageError, match="no slot"):
        peft_to_inputs(grid_adapters["travel"], _slots(built))


# --- the stage as the user runs it ------------------------------------------------------------------------------------


def stage_folder(tmp_path: Path, grid_base: Path | None, adapters: dict[str, Path]) -> Path:
    params = default_params()
    params["model"]["group_size"] = GROUP
    params["optimize"]["block_size"] = GROUP
    params["optimize"]["eval_rows"] = 4
    params["evaluate"]["max_seq_len"] = 128
    write_params(tmp_path, params)
    if grid_base is not None:
        shutil.copytree(grid_base, tmp_path / "models" / "quantized")
    for task, folder in adapters.items():
        shutil.copytree(folder, tmp_path / "models" / "adapters" / task)
    for task in TASKS:
        split = tmp_path / "data" / "split" / task
        split.mkdir(parents=True)
        (split / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    return tmp_path


def test_missing_quantized_model_is_one_line(tmp_path, grid_adapters):
    folder = stage_folder(tmp_path, None, grid_adapters)
    proc = run_stage("optimize", folder)
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "optimize: error: models/quantized/config.json: not found (run `dvc repro quantize` first)"
    ]
    assert "Traceback" not in proc.stderr
    assert not (folder / "models" / "onnx").exists()


def test_adapter_without_config_is_one_line(tmp_path, grid_base, grid_adapters):
    folder = stage_folder(tmp_path, grid_base, grid_adapters)
    (folder / "models" / "adapters" / "trip_json" / "adapter_config.json").unlink()
    proc = run_stage("optimize", folder)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert "models/adapters/trip_json/adapter_config.json: not found" in line
    assert "Traceback" not in proc.stderr
    assert not (folder / "models" / "onnx").exists()


@pytest.mark.slow
def test_stage_builds_model_adapters_and_metrics(tmp_path, grid_base, grid_adapters):
    folder = stage_folder(tmp_path, grid_base, grid_adapters)
    proc = run_stage("optimize", folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = folder / "models" / "onnx"
    assert (out / "model" / "model.onnx").exists() and (out / "model" / "genai_config.json").exists()
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [f"{t}.onnx_adapter" for t in sorted(TASKS)]
    metrics = json.loads((folder / "metrics" / "optimize.json").read_text())
    assert metrics["int4_grid_error"]["max_rel"] < 1e-6
    for task in TASKS:
        assert metrics["agreement"][task]["argmax_agreement"] >= 0.95
        assert abs(metrics["agreement"][task]["loss_ratio"] - 1) <= 0.02
    assert metrics["model_mb"] > 0 and metrics["tokenizer_texts_checked"] > 20
    perf = json.loads((folder / "metrics" / "perf" / "optimize.json").read_text())
    assert perf["build_seconds"] > 0 and perf["check_seconds"] > 0


def test_cuda_graph_switch_edits_only_a_cuda_models_config(built, tmp_path):
    from olive_lab.onnx.build import set_cuda_graph

    def cuda_options(path: Path) -> list:
        options = json.loads(path.read_text())["model"]["decoder"]["session_options"].get("provider_options", [])
        return [o["cuda"] for o in options if "cuda" in o]

    for variant in ("cuda", "lora"):
        shutil.copytree(built[variant] / "model", tmp_path / variant, ignore=shutil.ignore_patterns("*.onnx*"))
    config = tmp_path / "cuda" / "genai_config.json"
    assert cuda_options(config) == [{"enable_cuda_graph": "0"}]  # what optimize writes by default
    set_cuda_graph(tmp_path / "cuda", True)
    assert cuda_options(config) == [{"enable_cuda_graph": "1"}]
    before = (tmp_path / "lora" / "genai_config.json").read_text()
    set_cuda_graph(tmp_path / "lora", True)
    assert cuda_options(tmp_path / "lora" / "genai_config.json") == []
    assert json.loads((tmp_path / "lora" / "genai_config.json").read_text()) == json.loads(before)


def test_switch_layout_with_cuda_graph_is_refused_before_building(tmp_path, grid_base, grid_adapters):
    with pytest.raises(StageError, match="cuda_graph=false or optimize.lora_layout=branches"):
        build_onnx(
            grid_base,
            tmp_path / "out",
            grid_adapters,
            block_size=GROUP,
            execution_provider="cuda",
            lora_layout="switch",
            cuda_graph=True,
        )
    assert not (tmp_path / "out").exists()
