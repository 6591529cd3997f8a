"""Model validation (gguf-layout.md §6): what loads, and what is refused, with which message."""
import json
import os
import random
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

import ds4
from ds4.tokenizer import gguf_vocab_from_tokenizer_json
from conftest import subprocess_env
from gguf_header import patch, walk

WORKER = os.path.join(os.path.dirname(__file__), "load_worker.py")


def load_error(path):
    with pytest.raises(ds4.ModelFormatError) as exc:
        ds4.load(path)
    assert str(path) in str(exc.value)
    return str(exc.value)


@pytest.fixture
def mutable_q2(tmp_path, tiny_q2):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_q2, path)
    return path


# ---- what loads ----

def test_tiny_model_loads_with_shapes_from_metadata(tiny_q2, tiny_config):
    with ds4.load(tiny_q2) as m:
        c = m.config
        assert (c.n_layer, c.n_embd, c.n_head, c.head_dim) == (
            tiny_config.n_layer, tiny_config.n_embd, tiny_config.n_head, tiny_config.head_dim)
        assert list(c.compress_ratios) == list(tiny_config.compress_ratios[:c.n_layer])
        assert c.variant == "q2"
        assert not c.is_flash and c.profile.startswith("custom shape")
        assert all(t == ("IQ2_XXS", "IQ2_XXS", "Q2_K") for t in c.expert_types)
        assert m.backend == "cpu"


def test_q4_variant_is_recognised(tiny_q4):
    with ds4.load(tiny_q4) as m:
        assert m.config.variant == "q4"
        assert all(t == ("Q4_K",) * 3 for t in m.config.expert_types)


def test_metadata_is_readable_from_python(tiny_q2, tiny_config):
    with ds4.load(tiny_q2) as m:
        md = m.gguf.metadata
        assert md["general.architecture"] == "deepseek4"
        assert md["deepseek4.block_count"] == tiny_config.n_layer
        assert len(md["tokenizer.ggml.tokens"]) == 129280
        assert m.gguf.metadata_type("deepseek4.block_count") == ("u32", None)


# ---- semantic errors: one field patched, one clear message ----

def test_block_count_beyond_the_layers_present_is_refused(mutable_q2, tiny_config):
    f = walk(mutable_q2).kv["deepseek4.block_count"]
    patch(mutable_q2, f.value_offset, "<I", tiny_config.n_layer + 1)
    msg = load_error(mutable_q2)
    assert "swiglu_clamp_exp has" in msg or "required tensor is missing" in msg


def test_head_count_disagreeing_with_tensors_names_the_tensor(mutable_q2, tiny_config):
    f = walk(mutable_q2).kv["deepseek4.attention.head_count"]
    patch(mutable_q2, f.value_offset, "<I", tiny_config.n_head * 2)
    msg = load_error(mutable_q2)
    assert "expected" in msg and "from the metadata" in msg and "blk.0." in msg


def test_u32_key_stored_as_i32_counts_as_missing(mutable_q2):
    f = walk(mutable_q2).kv["deepseek4.block_count"]
    patch(mutable_q2, f.type_offset, "<I", 5)
    assert "required metadata key is missing: deepseek4.block_count" in load_error(mutable_q2)


def test_negative_compress_ratio_is_refused(mutable_q2):
    f = walk(mutable_q2).kv["deepseek4.attention.compress_ratios"]
    assert f.array_type == 5
    patch(mutable_q2, f.value_offset + 4 * 2, "<i", -4)
    assert "compression ratio at layer 2: got -4" in load_error(mutable_q2)


def test_gate_and_up_experts_of_different_types_are_refused(mutable_q2):
    t = walk(mutable_q2).tensors["blk.1.ffn_up_exps.weight"]
    patch(mutable_q2, t.type_offset, "<I", gguf.GGMLQuantizationType.Q2_K)
    assert "routed gate/up experts use different quant types in layer 1" in load_error(mutable_q2)


def test_wrong_tensor_type_names_tensor_and_types(mutable_q2):
    t = walk(mutable_q2).tensors["blk.0.attn_q_a.weight"]
    patch(mutable_q2, t.type_offset, "<I", gguf.GGMLQuantizationType.F32)
    msg = load_error(mutable_q2)
    assert "blk.0.attn_q_a.weight has type F32" in msg and "expected Q8_0" in msg


def test_missing_required_special_token_is_named(mutable_q2):
    f = walk(mutable_q2).kv["tokenizer.ggml.tokens"]
    tokens = gguf_vocab_from_tokenizer_json()[0]   # what the generator wrote
    think = tokens.index("<think>")
    patch(mutable_q2, f.string_offsets[think] + 8, "<7s", b"<thinK>")
    assert "required tokenizer token missing: <think>" in load_error(mutable_q2)


def test_hash_table_routing_to_a_missing_expert_is_refused(mutable_q2, tiny_config):
    h = walk(mutable_q2)
    t = h.tensors["blk.0.ffn_gate_tid2eid.weight"]
    data_start = -(-h.end // 32) * 32
    k = tiny_config.n_expert_used
    patch(mutable_q2, data_start + t.rel_offset + 4 * (k + 1), "<i", tiny_config.n_expert)  # token 1
    msg = load_error(mutable_q2)
    assert "blk.0.ffn_gate_tid2eid.weight: token 1 routes to expert" in msg


def test_missing_tensor_is_named(mutable_q2):
    t = walk(mutable_q2).tensors["blk.2.attn_sinks.weight"]
    patch(mutable_q2, t.name_len_offset + 8, "<3s", b"BLK")
    msg = load_error(mutable_q2)
    assert "required tensor is missing: blk.2.attn_sinks.weight" in msg


def test_missing_selection_bias_is_a_warning_not_an_error(mutable_q2, tiny_config):
    layer = tiny_config.n_hash_layers   # the first top-k routed layer
    t = walk(mutable_q2).tensors[f"blk.{layer}.exp_probs_b.bias"]
    patch(mutable_q2, t.name_len_offset + 8, "<3s", b"BLK")
    # the renamed tensor is also reported as one the model does not use
    with pytest.warns(UserWarning, match="exp_probs_b.bias is missing"), \
            pytest.warns(UserWarning, match="not used by DeepSeek V4 Flash"):
        with ds4.load(mutable_q2) as m:
            assert any("not used by DeepSeek V4 Flash" in w for w in m.warnings)


def test_mtp_file_given_as_main_model_is_named(tmp_path):
    path = tmp_path / "mtp.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek4_mtp_support")
    w.add_tensor("mtp.0.e_proj.weight", np.zeros((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "MTP support file" in load_error(path)


def test_foreign_gguf_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "required metadata key is missing: deepseek4.block_count" in load_error(path)


def test_not_a_file_errors_are_clear(tmp_path):
    with pytest.raises(ds4.Error, match="no such model file"):
        ds4.load(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_text("hello, this is not a model at all\n")
    assert "not a GGUF file" in load_error(tmp_path / "text.gguf")


# ---- malformed files in bulk, each loaded in a subprocess ----

def run_mutations(base, mutations, tmp_path):
    """Results by mutation id; a worker crash is recorded and the rest continue."""
    results = {}
    pending = list(mutations)
    while pending:
        proc = subprocess.Popen([sys.executable, WORKER, str(base), str(tmp_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=tmp_path, env=subprocess_env())
        out, _ = proc.communicate("".join(json.dumps(m) + "\n" for m in pending), timeout=600)
        for line in out.splitlines():
            r = json.loads(line)
            results[r["id"]] = r
        pending = [m for m in pending if m["id"] not in results]
        if pending:  # the worker died on pending[0]
            results[pending[0]["id"]] = {"id": pending[0]["id"], "result": "crash",
                                         "message": f"exit status {proc.returncode}"}
            pending = pending[1:]
    return results


# gguf-layout.md §2.1: keys that must be stored as u32 (type 4) exactly.
REQUIRED_U32_KEYS = {"deepseek4." + k for k in (
    "block_count", "embedding_length", "vocab_size", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "rope.dimension_count", "attention.q_lora_rank", "attention.output_lora_rank",
    "attention.output_group_count", "expert_count", "expert_used_count",
    "expert_feed_forward_length", "expert_shared_count", "hash_layer_count",
    "attention.sliding_window", "attention.indexer.head_count", "attention.indexer.key_length",
    "attention.indexer.top_k", "hyper_connection.count", "hyper_connection.sinkhorn_iterations")}


def structural_mutations(path):
    """Truncations and bit flips that must each make the file invalid."""
    h = walk(path)
    size = os.path.getsize(path)
    data_start = -(-h.end // 32) * 32
    data_end = max(data_start + t.rel_offset for t in h.tensors.values())  # start of last tensor
    muts = []
    # truncations anywhere before the end of the last tensor's data
    points = sorted(set(np.linspace(0, data_end, 100, dtype=np.int64).tolist() +
                        [0, 31, 32, 40, h.end - 1, h.end, data_start, data_end, size - 40]))
    muts += [{"kind": "truncate", "at": p} for p in reversed(points) if p < size - 32]
    muts += [{"kind": "flip", "offset": o, "bit": b} for o in range(4) for b in range(8)]  # magic
    muts += [{"kind": "flip", "offset": 4 + o, "bit": b} for o in range(4) for b in range(8)]  # version
    for t in h.tensors.values():
        muts.append({"kind": "flip", "offset": t.dim_offsets[0], "bit": 3})
        muts.append({"kind": "flip", "offset": t.type_offset, "bit": 2})
    for t in list(h.tensors.values())[::5]:
        muts.append({"kind": "flip", "offset": t.n_dims_offset, "bit": 1})
        muts.append({"kind": "flip", "offset": t.offset_offset + 6, "bit": 5})  # bit 53
        muts.append({"kind": "flip", "offset": t.name_len_offset + 5, "bit": 0})  # length bit 40
    for f in h.kv.values():
        if f.key in REQUIRED_U32_KEYS:
            muts.append({"kind": "flip", "offset": f.type_offset, "bit": 0})  # u32 -> i32
        muts.append({"kind": "flip", "offset": f.key_len_offset + 6, "bit": 7})  # bit 55
    for i, m in enumerate(muts):
        m["id"] = i
    return muts


def test_hundreds_of_malformed_files_each_give_model_format_error(tiny_q2, tmp_path):
    muts = structural_mutations(tiny_q2)
    assert len(muts) >= 200
    results = run_mutations(tiny_q2, muts, tmp_path)
    bad = [(m, results[m["id"]]) for m in muts if results[m["id"]]["result"] != "ModelFormatError"]
    assert not bad, f"{len(bad)} of {len(muts)} mutants were not refused cleanly: {bad[:5]}"


def test_random_header_bit_flips_never_crash(tiny_q2, tmp_path):
    h = walk(tiny_q2)
    rng = random.Random(1234)
    # most of the header is the tokenizer arrays; every third mutant also builds
    # the tokenizer from them (the slow part)
    muts = [{"id": i, "kind": "flip", "offset": rng.randrange(0, h.end), "bit": rng.randrange(8),
             "tokenizer": i % 3 == 0} for i in range(120)]
    results = run_mutations(tiny_q2, muts, tmp_path)
    outcomes = {r["result"] for r in results.values()}
    bad = [r for r in results.values() if r["result"] not in ("ok", "ModelFormatError")]
    assert not bad, bad[:5]
    assert "ModelFormatError" in outcomes
