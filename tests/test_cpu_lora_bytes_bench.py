"""bench.cpu_lora_bytes times the rank-16 adapter against itself cut to rank 8: the cut must keep, for every part of
a packed slot, that part's own first columns of A and rows of B (a cut that mixed parts up would still decode, at the
same speed, and the bench would say nothing about the adapter it claims to halve)."""

import numpy as np
import onnxruntime as ort

from bench.cpu_lora_bytes import cut_rank


def test_cut_rank_keeps_each_parts_first_columns_of_a_and_rows_of_b(tmp_path):
    rng = np.random.default_rng(0)
    k, parts, r, n = 6, 3, 4, 10  # a qkv slot: A [K, P * r], B [r, N]
    a = rng.standard_normal((k, parts * r)).astype(np.float16)
    b = rng.standard_normal((r, n)).astype(np.float16)
    source = ort.AdapterFormat()
    source.set_adapter_version(1)
    source.set_model_version(1)
    names = {"A": "model.layers.0.attn.qkv_proj.lora_A.weight", "B": "model.layers.0.attn.qkv_proj.lora_B.weight"}
    source.set_parameters({names["A"]: ort.OrtValue.ortvalue_from_numpy(a),
                           names["B"]: ort.OrtValue.ortvalue_from_numpy(b)})  # fmt: skip
    source.export_adapter(str(tmp_path / "rank4.onnx_adapter"))

    out = cut_rank(tmp_path / "rank4.onnx_adapter", tmp_path / "rank2.onnx_adapter", 2)

    cut = {name: value.numpy() for name, value in ort.AdapterFormat.read_adapter(str(out)).get_parameters().items()}
    want_a = np.concatenate([a[:, p * r : p * r + 2] for p in range(parts)], axis=1)
    assert cut[names["A"]].shape == (k, parts * 2) and (cut[names["A"]] == want_a).all()
    assert (cut[names["B"]] == b[:2]).all()
    assert sum(v.nbytes for v in cut.values()) * 2 == a.nbytes + b.nbytes  # half the bytes
