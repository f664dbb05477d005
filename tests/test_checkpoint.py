"""Checkpoint formats, the layout conversion (on the full 7B name/shape list) and strict errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import paddle
import pytest

from conftest import SHARED, tiny_overrides
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
from paddlemix.models.internlm_xcomposer2.checkpoint import CheckpointError, build_model
from paddlemix.models.internlm_xcomposer2.conversion import convert_shapes, from_model_name, to_model_name

FULL_7B = SHARED / "fixtures" / "ixc2-7b-state-dict.json"
INDEX_7B = SHARED / "fixtures" / "ixc2-7b-pytorch_model.bin.index.json"


@pytest.fixture(scope="module")
def full_7b():
    spec = json.loads(FULL_7B.read_text(encoding="utf-8"))
    config = InternLMXComposer2Config(**{k: v for k, v in spec["config"].items() if k != "model_type"})
    model = build_model(InternLMXComposer2ForCausalLM, config, "bfloat16", lazy=True)  # allocates nothing
    expected = {name: list(p.shape) for name, p in model.state_dict().items()}
    official = {name: v["shape"] for name, v in spec["parameters"].items()}
    return config, expected, official


def test_7b_config_reads_real_config_unchanged(full_7b):
    config, expected, _ = full_7b
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.img_size) == (4096, 32, 8, 224)
    assert (config.lora_r, config.lora_alpha, config.vision.hidden_size, config.num_image_tokens) == (256, 256, 1024, 256)
    assert sum(int(np.prod(s)) for s in expected.values()) == 8665847808


def test_7b_hf_layout_maps_every_tensor(full_7b):
    _, expected, official = full_7b
    assert convert_shapes(official, "hf") == expected
    index = json.loads(INDEX_7B.read_text(encoding="utf-8"))["weight_map"]
    assert set(index) == set(official)


def _paddlemix_names_from_readme(official: dict) -> dict:
    """PaddleMIX's names/shapes derived independently, by the rule in the fixture README."""
    vit = "vit.vision_tower.vision_model."
    rules = [("embeddings.class_embedding", "class_embedding"), ("embeddings.patch_embedding.", "conv1."),
             ("embeddings.position_embedding.", "positional_embedding."), ("pre_layrnorm.", "ln_pre."),
             ("encoder.layers.", "transformer.layers."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
             ("mlp.fc1.", "linear1."), ("mlp.fc2.", "linear2.")]
    out = {}
    for name, shape in official.items():
        if "post_layernorm" in name:
            continue  # PaddleMIX has ln_post = Identity
        if name.startswith(vit):
            tail = name[len(vit):]
            for a, b in rules:
                tail = tail.replace(a, b)
            name = vit + tail
        linear = len(shape) == 2 and name.endswith(".weight") and "embedding" not in name
        out[name] = shape[::-1] if linear else shape
    return out


def test_7b_paddlemix_layout_maps_every_tensor(full_7b):
    _, expected, official = full_7b
    paddlemix = _paddlemix_names_from_readme(official)
    converted = convert_shapes(paddlemix, "paddlemix")
    optional = {n for n in expected if "post_layernorm" in n}
    assert set(converted) == set(expected) - optional
    assert all(converted[n] == expected[n] for n in converted)
    assert {from_model_name(n, "paddlemix") for n in expected if n not in optional} == set(paddlemix)


def test_7b_paddle_layout_is_identity(full_7b):
    _, expected, _ = full_7b
    assert convert_shapes(expected, "paddle") == expected
    assert all(to_model_name(n, "paddle") == n for n in expected)


def _params(model) -> dict:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_safetensors_and_torch_bin_load_identically_without_torch(tiny_dir, tmp_path):
    """Load pytorch_model.bin in a fresh process and prove torch was never imported
    (CI has no torch installed at all; this also shows nothing even tried to use it)."""
    ckpt = _copy_fixture(tiny_dir, tmp_path / "bin_only")
    (ckpt / "pytorch_model.bin").symlink_to(tiny_dir / "pytorch_model.bin")
    out = tmp_path / "from_bin.npz"
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM
        m = InternLMXComposer2ForCausalLM.from_pretrained({str(ckpt)!r})
        np.savez({str(out)!r}, **{{k: v.numpy() for k, v in m.state_dict().items()}})
        assert "torch" not in sys.modules, "the .bin reader must not use torch"
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    from_bin = dict(np.load(out))
    from_safe = _params(InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=_cfg(tiny_dir)))
    assert from_bin.keys() == from_safe.keys()
    for name in from_safe:
        np.testing.assert_array_equal(from_bin[name], from_safe[name], err_msg=name)


def _cfg(tiny_dir):
    from paddlemix.models.internlm_xcomposer2.checkpoint import load_config

    return load_config(str(tiny_dir), **tiny_overrides())


@pytest.mark.parametrize("safe", [False, True])
def test_sharded_checkpoint_round_trip(tiny_model, tmp_path, safe):
    tiny_model.save_pretrained(str(tmp_path), max_shard_size="2MB", safe_serialization=safe)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("model")]) > 3  # shards + index
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".saving")]
    reloaded = InternLMXComposer2ForCausalLM.from_pretrained(str(tmp_path))
    a, b = _params(tiny_model), _params(reloaded)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resave_in_another_format_leaves_no_stale_weights(tiny_model, tmp_path):
    tiny_model.save_pretrained(str(tmp_path), safe_serialization=True)
    tiny_model.save_pretrained(str(tmp_path))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model")) == ["model_state.pdparams"]


def test_bfloat16_save_and_reload(tiny_dir, tiny_config, tmp_path):
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config, dtype="bfloat16")
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    again = InternLMXComposer2ForCausalLM.from_pretrained(str(tmp_path), dtype="bfloat16")
    for name, tensor in again.state_dict().items():
        ref = model.state_dict()[name]
        assert tensor.dtype == ref.dtype == paddle.bfloat16
        np.testing.assert_array_equal(tensor.astype("float32").numpy(), ref.astype("float32").numpy())


# --- bad checkpoints ----------------------------------------------------------------------------
def _copy_fixture(tiny_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(tiny_overrides())
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _official_tensors(tiny_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(tiny_dir / "model.safetensors"))


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: /no/such/dir"):
        InternLMXComposer2ForCausalLM.from_pretrained("/no/such/dir", config=InternLMXComposer2Config())


def test_directory_without_weights(tiny_dir, tmp_path):
    ckpt = _copy_fixture(tiny_dir, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*ckpt: expected one of model.safetensors"):
        InternLMXComposer2ForCausalLM.from_pretrained(str(ckpt))


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    ckpt = _copy_fixture(tiny_dir, tmp_path / "ckpt")
    tensors = _official_tensors(tiny_dir)
    del tensors["model.layers.1.feed_forward.w2.Plora_A.weight"]
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    _write_safetensors(ckpt / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as err:
        InternLMXComposer2ForCausalLM.from_pretrained(str(ckpt))
    msg = str(err.value)
    assert "1 missing tensors: model.layers.1.feed_forward.w2.Plora_A.weight" in msg
    assert "1 unexpected tensors: model.layers.9.extra.weight (in model.safetensors)" in msg


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    ckpt = _copy_fixture(tiny_dir, tmp_path / "ckpt")
    tensors = _official_tensors(tiny_dir)
    tensors["model.layers.0.attention.wo.weight"] = np.zeros((16, 17), np.float32)
    _write_safetensors(ckpt / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=re.escape("model.layers.0.attention.wo.weight in model.safetensors: checkpoint [17, 16], model [16, 16]")):
        InternLMXComposer2ForCausalLM.from_pretrained(str(ckpt))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_file_is_named(tiny_dir, tmp_path, name):
    ckpt = _copy_fixture(tiny_dir, tmp_path / "ckpt")
    data = (tiny_dir / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / name))):
        InternLMXComposer2ForCausalLM.from_pretrained(str(ckpt))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "model_state.pdparams"])
def test_garbage_file_is_named(tiny_dir, tmp_path, name):
    ckpt = _copy_fixture(tiny_dir, tmp_path / "ckpt")
    (ckpt / name).write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / name))):
        InternLMXComposer2ForCausalLM.from_pretrained(str(ckpt))


def test_position_table_resized_on_load(tiny_dir, tmp_path, golden):
    """A checkpoint holding CLIP's original 24x24 table is resized to the model's grid."""
    ckpt = _copy_fixture(tiny_dir, tmp_path / "ckpt")
    tensors = _official_tensors(tiny_dir)
    tensors["vit.vision_tower.vision_model.embeddings.position_embedding.weight"] = golden["posemb_interp_in"]
    _write_safetensors(ckpt / "model.safetensors", tensors)
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(ckpt))
    table = model.vit.vision_tower.vision_model.embeddings.position_embedding.weight.numpy()
    np.testing.assert_allclose(table, golden["posemb_interp_out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["ixc2-tiny", "ixc2-tiny-paddlemix"])
def test_offline_conversion_round_trip(source, tiny_model_dir, tmp_path, golden):
    """convert_checkpoint (streamed, sharded) gives a directory that loads to the same numbers."""
    from paddlemix.models.internlm_xcomposer2.convert import convert_checkpoint

    src = tiny_model_dir if source == "ixc2-tiny" else SHARED / "fixtures" / source
    files = convert_checkpoint(str(src), str(tmp_path / "out"), max_shard_bytes=3_000_000)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    converted = InternLMXComposer2ForCausalLM.from_pretrained(str(tmp_path / "out"))
    direct = InternLMXComposer2ForCausalLM.from_pretrained(str(src))
    a, b = _params(direct), _params(converted)
    assert all(np.array_equal(a[k], b[k]) for k in a if "post_layernorm" not in k)
    with paddle.no_grad():
        logits = converted(inputs_embeds=paddle.to_tensor(golden["chat_inputs_embeds"])[None],
                           im_mask=paddle.to_tensor(golden["chat_im_mask"])[None]).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, golden["chat_logits_last"], atol=1e-4, rtol=0)
