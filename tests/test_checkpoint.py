"""Checkpoint loading: bit-exact round trip, and one clear error per kind of bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from echox.checkpoint import open_model_folder, resolve_vocoder, resolve_whisper
from echox.errors import EchoXError
from echox.weights import Checkpoint, embedding_table, save_sharded


@pytest.fixture
def model_copy(tiny_root, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    shutil.copytree(tiny_root, tmp_path / "root")
    return tmp_path / "root" / "EchoX-tiny"


def test_sharded_round_trip_is_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"layer.{i}.w": torch.randn(5, i + 1, generator=gen).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}
    save_sharded(tensors, tmp_path, shards=4)
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(tensors)
    for key, tensor in tensors.items():
        got = ckpt.get(key)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert ckpt.get("layer.0.w", dtype=torch.float16).dtype == torch.float16


def test_tiny_checkpoint_loads_and_every_tensor_is_claimed(tiny_model_dir):
    model = open_model_folder(tiny_model_dir)
    claimed = set().union(*model.layouts())
    assert claimed == set(model.weights.keys())
    assert resolve_whisper(model, None).name == "whisper-tiny"
    assert resolve_vocoder(model, None) == tiny_model_dir


LOAD_AND_LIST_SLOW_IMPORTS = """
import sys
from echox.engine import load
load(sys.argv[1], max_batch=2)
print([name for name in ("torch._dynamo", "sympy") if name in sys.modules])
"""


def test_loading_an_engine_imports_neither_dynamo_nor_sympy(tiny_model_dir):
    """Modules are built on the meta device. An embedding's random init there would import
    torch._dynamo (about 2 s of every load) and `to_empty` sympy (about 0.5 s), both for nothing."""
    done = subprocess.run([sys.executable, "-c", LOAD_AND_LIST_SLOW_IMPORTS, str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_embedding_table_off_the_meta_device_keeps_the_random_init():
    torch.manual_seed(0)
    table = embedding_table(1000, 64)
    assert 0.9 < table.weight.std().item() < 1.1  # nn.Embedding's N(0, 1)
    with torch.device("meta"):
        assert embedding_table(1000, 64).weight.is_meta


def _rewrite_shard(folder, edit):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))


def test_missing_tensor_is_named(model_copy):
    victim = "model.layers.0.self_attn.k_proj.weight"
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    shard = model_copy / index["weight_map"][victim]
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard))
    with pytest.raises(EchoXError, match="missing tensor 'model.layers.0.self_attn.k_proj.weight'"):
        open_model_folder(model_copy)


def test_unexpected_tensor_is_named(model_copy):
    _rewrite_shard(model_copy, lambda t: t.update({"model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(EchoXError, match="unexpected tensors.*model.extra_head.weight"):
        open_model_folder(model_copy)


def test_integer_weights_are_refused_not_cast(model_copy):
    def to_integers(tensors):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].round().long()
        to_integers.key = key
    _rewrite_shard(model_copy, to_integers)
    with pytest.raises(EchoXError, match=f"'{to_integers.key}' is stored as I64, but weights are floating point"):
        open_model_folder(model_copy)


def test_shape_mismatch_names_key_and_shapes(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["intermediate_size"] = 100
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(EchoXError, match=r"mlp.gate_proj.weight' has shape \[128, 64\], but the LLM config "
                                         r"expects \[100, 64\]"):
        open_model_folder(model_copy)


def test_echo_decoder_size_disagreeing_with_unit_model(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["unit_model"] = "small"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(EchoXError, match=r"unit_model='small' means .* 4 layers x 512, but the weights hold 2 x 64"):
        open_model_folder(model_copy)


def test_truncated_shard(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(EchoXError, match="not a readable safetensors file"):
        open_model_folder(model_copy)


def test_corrupt_shard(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(EchoXError, match=f"{shard.name}: not a readable safetensors file"):
        open_model_folder(model_copy)


def test_missing_shard_listed_in_index(model_copy):
    sorted(model_copy.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(EchoXError, match="lists shards that are missing: model-00001-of-00002.safetensors"):
        open_model_folder(model_copy)


def test_folder_without_weights(model_copy):
    for f in model_copy.glob("model*"):
        f.unlink()
    with pytest.raises(EchoXError, match="no \\*.safetensors weights"):
        open_model_folder(model_copy)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_config_or_tokenizer(model_copy, name):
    (model_copy / name).unlink()
    with pytest.raises(EchoXError, match=f"{name}: file not found"):
        open_model_folder(model_copy)


def test_unknown_rope_type(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(EchoXError, match="rope_scaling type 'yarn' is not supported"):
        open_model_folder(model_copy)


def test_missing_whisper_folder_says_what_was_tried(model_copy):
    shutil.rmtree(model_copy.parent / "whisper-tiny")
    with pytest.raises(EchoXError, match="no Whisper encoder folder found .*pass --whisper"):
        resolve_whisper(open_model_folder(model_copy), None)


def test_tied_model_ignores_a_stored_head_copy(tmp_path):
    """EchoX-3B style: the head is the embedding table; a stored lm_head.weight is not refused."""
    from echox.llama import load_lm
    from echox.tiny import TinySpec, write_tiny_checkpoint
    model_dir = write_tiny_checkpoint(tmp_path, TinySpec(tie_word_embeddings=True))
    assert "lm_head.weight" not in open_model_folder(model_dir).weights.keys()
    _rewrite_shard(model_dir, lambda t: t.update({"lm_head.weight": torch.zeros(263, 64)}))
    folder = open_model_folder(model_dir)
    lm = load_lm(folder.weights, folder.config.llm, torch.float32, "cpu")
    assert lm.lm_head.weight is lm.embed_tokens.weight and lm.lm_head.weight.abs().sum() > 0


def _edit_json(path, edit):
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", None, "field 'vocab_size' is null, expected a positive integer"),
    ("vocab_size", "128257", 'field \'vocab_size\' is "128257", expected a positive integer'),
    ("hidden_size", 64.5, "field 'hidden_size' is 64.5, expected a positive integer"),
    ("num_attention_heads", 0, "field 'num_attention_heads' is 0"),
    ("num_hidden_layers", True, "field 'num_hidden_layers' is true"),
    ("rope_scaling", "yes", 'field \'rope_scaling\' is "yes", expected an object'),
    ("rms_norm_eps", "abc", 'field \'rms_norm_eps\' is "abc", expected a positive number'),
    ("rope_theta", -1, "field 'rope_theta' is -1"),
    ("audio_tower", 5, "field 'audio_tower' is 5, expected a string"),
    ("unit_model", ["large"], "field 'unit_model' is \\[\"large\"\\], expected a string"),
    ("tie_word_embeddings", "false", "field 'tie_word_embeddings' is \"false\", expected true or false"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("num_attention_heads", 6, "hidden_size 64 is not a multiple of num_attention_heads 6 \\(the speech adapter"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported \\(EchoX's Llama uses 'silu'\\)"),  # ran as SiLU
    ("attention_bias", True, "attention_bias true is not supported"),  # its biases went unread
    ("mlp_bias", True, "mlp_bias true is not supported"),
])
def test_config_fields_of_the_wrong_type_are_named(model_copy, field, value, message):
    _edit_json(model_copy / "config.json", lambda raw: raw.__setitem__(field, value))
    with pytest.raises(EchoXError, match=message) as info:
        open_model_folder(model_copy)
    assert "config.json" in str(info.value)


def test_nested_rope_scaling_field_is_named(model_copy):
    _edit_json(model_copy / "config.json", lambda raw: raw["rope_scaling"].__setitem__("factor", "8"))
    with pytest.raises(EchoXError, match="config.json: rope_scaling: field 'factor' is \"8\""):
        open_model_folder(model_copy)


def test_a_size_beyond_float_range_is_named(model_copy):
    """It passed the checks, then RoPE's table raised OverflowError (int too big to convert)."""
    _edit_json(model_copy / "config.json",
               lambda raw: raw["rope_scaling"].__setitem__("original_max_position_embeddings", 10**30))
    with pytest.raises(EchoXError, match="rope_scaling: field 'original_max_position_embeddings' is 1000000000000"
                                         "000000000000000000, expected a positive integer \\(at most 2\\*\\*53\\)"):
        open_model_folder(model_copy)


def test_a_config_that_is_a_folder_is_named_as_such(model_copy):
    """It was called 'file not found'."""
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").mkdir()
    with pytest.raises(EchoXError, match="config.json: is a folder, not a JSON file"):
        open_model_folder(model_copy)


def test_config_that_is_not_an_object(model_copy):
    (model_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(EchoXError, match="expected a JSON object"):
        open_model_folder(model_copy)


@pytest.mark.parametrize("weight_map,message", [
    (["model-00001-of-00002.safetensors"], "'weight_map' must map tensor names"),
    ({"x": 5}, "'weight_map' must map tensor names"),
    ({"x": "../../../etc/passwd"}, "names shards outside the model folder: ../../../etc/passwd"),
    ({"x": "/etc/passwd"}, "names shards outside the model folder: /etc/passwd"),
])
def test_bad_index_is_refused_before_any_shard_is_opened(model_copy, weight_map, message):
    _edit_json(model_copy / "model.safetensors.index.json", lambda raw: raw.__setitem__("weight_map", weight_map))
    with pytest.raises(EchoXError, match=message):
        open_model_folder(model_copy)


def test_unreadable_shard_is_not_called_missing(model_copy):
    """A shard the OS refuses to read (here a folder by that name; chmod 000 does not stop root)."""
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(EchoXError, match=f"{shard.name}: cannot be read \\(Is a directory\\)"):
        open_model_folder(model_copy)


def test_converted_vocoder_beside_an_unindexed_model(model_copy, tmp_path):
    """A single-file model folder (no index) with a converted vocoder in it loads both parts."""
    from echox.vocoder import convert_fairseq_vocoder, load_vocoder
    weights = Checkpoint(model_copy)
    save_file({key: weights.get(key) for key in weights.keys()}, str(model_copy / "model.safetensors"))
    for old in [*model_copy.glob("model-*.safetensors"), model_copy / "model.safetensors.index.json"]:
        old.unlink()
    convert_fairseq_vocoder(model_copy, model_copy / "vocoder.safetensors")
    (model_copy / "g_00500000").unlink()
    assert set(open_model_folder(model_copy).weights.keys()) == set(weights.keys())
    assert load_vocoder(model_copy).conv_post.weight.shape[0] == 1


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def test_tensor_in_two_shards_is_refused_naming_both(model_copy):
    """The index puts q_proj in shard 1; a stale copy in shard 2 used to win, by sorting last."""
    first, second = sorted(model_copy.glob("model-*.safetensors"))
    tensors = load_file(str(second))
    tensors[Q_PROJ] = torch.full_like(load_file(str(first))[Q_PROJ], 7.0)
    save_file(tensors, str(second))
    with pytest.raises(EchoXError, match=f"'{Q_PROJ}' is stored twice, in .*{first.name} and in .*{second.name}"):
        open_model_folder(model_copy)


def test_stale_single_file_beside_unindexed_shards_is_refused(model_copy):
    (model_copy / "model.safetensors.index.json").unlink()
    first = sorted(model_copy.glob("model-*.safetensors"))[0]
    save_file({Q_PROJ: torch.full_like(load_file(str(first))[Q_PROJ], 7.0)}, str(model_copy / "model.safetensors"))
    with pytest.raises(EchoXError, match=f"'{Q_PROJ}' is stored twice, in .*{first.name} and in .*model.safetensors"):
        open_model_folder(model_copy)


def test_backup_copy_beside_whisper_weights_is_refused(model_copy):
    whisper = model_copy.parent / "whisper-tiny"
    tensors = load_file(str(whisper / "model.safetensors"))
    save_file({key: torch.zeros_like(t) for key, t in tensors.items()}, str(whisper / "model_backup.safetensors"))
    with pytest.raises(EchoXError, match="is stored twice, in .*model.safetensors and in .*model_backup.safetensors"):
        Checkpoint(whisper)


def test_hugging_face_variant_files_beside_the_model_are_not_read(model_copy):
    """openai/whisper-large-v3 ships model.safetensors (fp16) beside model.fp32-0000k-of-00002
    shards of the same tensors (with their own index name): the plain file is the model."""
    whisper = model_copy.parent / "whisper-tiny"
    tensors = load_file(str(whisper / "model.safetensors"))
    keys = sorted(tensors)
    for k, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        save_file({key: torch.zeros_like(tensors[key]) for key in part},
                  str(whisper / f"model.fp32-{k + 1:05d}-of-00002.safetensors"))
    loaded = Checkpoint(whisper)
    assert sorted(loaded.keys()) == keys
    assert all(torch.equal(loaded.get(key), tensors[key]) for key in keys)


def test_tensor_the_index_places_in_a_shard_that_lacks_it(model_copy):
    _edit_json(model_copy / "model.safetensors.index.json",
               lambda raw: raw["weight_map"].__setitem__("no.such.tensor", "model-00001-of-00002.safetensors"))
    with pytest.raises(EchoXError, match="model-00001-of-00002.safetensors: missing tensor 'no.such.tensor' "
                                         "\\(the index places it in this shard\\)"):
        Checkpoint(model_copy)


def test_tensor_stored_in_another_shard_than_the_index_says(model_copy):
    _edit_json(model_copy / "model.safetensors.index.json",
               lambda raw: raw["weight_map"].__setitem__(Q_PROJ, "model-00002-of-00002.safetensors"))
    with pytest.raises(EchoXError, match=f"places '{Q_PROJ}' in model-00002-of-00002.safetensors, but it is "
                                         "stored in model-00001-of-00002.safetensors"):
        Checkpoint(model_copy)


def test_loaded_tensor_is_not_a_view_of_the_file(tmp_path):
    """A tensor read in its stored dtype (fp32 -> fp32 on the CPU) used to stay a view of the file's
    memory map: rewriting the file on disk changed the running model's weights."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1024)}, str(path))
    got = Checkpoint(path).get("w", torch.float32)
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(4096)
    with path.open("r+b") as file:  # in place, as `cp new.safetensors w.safetensors` writes
        file.write(data)
    assert torch.equal(got, torch.ones(1024))


@pytest.mark.parametrize("key,squash", [
    ("model.mm_projector1.weight", lambda t: t.flatten()),
    ("unit_translator.aligner_MLP.0.weight", lambda t: t.flatten()[0].clone()),
    ("unit_translator.adapter.weight", lambda t: t.flatten()[0].clone()),
])
def test_weight_read_to_size_the_config_with_too_few_dimensions(model_copy, key, squash):
    """These shapes are read before any layout check, to size the config: an IndexError before."""
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    shard = model_copy / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = squash(tensors[key]).contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(EchoXError, match=f"'{key}' has shape \\[.*\\], but it is a weight matrix \\(2 dimensions\\)"):
        open_model_folder(model_copy)


def test_index_nested_too_deeply_is_one_error(model_copy):
    (model_copy / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(EchoXError, match="model.safetensors.index.json: not valid JSON \\(nested too deeply\\)"):
        Checkpoint(model_copy)


def _one_tensor_file(path, dtype: str, shape: list[int], nbytes: int):
    """A safetensors file written byte by byte, for dtypes torch cannot save."""
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x3c" * nbytes)


@pytest.mark.parametrize("dtype,nbytes", [("F4", 4), ("F6_E2M3", 6), ("F8_E8M0", 8)])
def test_float_formats_that_are_not_weights_are_named(tmp_path, dtype, nbytes):
    """These passed as floating point: F4 then crashed (NotImplementedError), F6_E2M3 was called a
    truncated file, and F8_E8M0 (a format for scales) was cast silently."""
    _one_tensor_file(tmp_path / "w.safetensors", dtype, [8], nbytes)
    weights = Checkpoint(tmp_path / "w.safetensors")
    message = f"'w' is stored as {dtype}, but weights are floating point, one of F16, BF16, F32, F64, F8_E4M3, F8_E5M2"
    with pytest.raises(EchoXError, match=message):
        weights.check({"w": (8,)}, "LLM")
    with pytest.raises(EchoXError, match=message):
        weights.get("w", torch.float32)


def test_float8_weights_are_read(tmp_path):
    _one_tensor_file(tmp_path / "w.safetensors", "F8_E4M3", [8], 8)
    weights = Checkpoint(tmp_path / "w.safetensors")
    weights.check({"w": (8,)}, "LLM")
    assert torch.equal(weights.get("w", torch.float32), torch.full((8,), 1.5))  # 0x3c in E4M3


def test_shard_that_is_a_fifo_is_refused_not_waited_on(model_copy):
    """Opening a FIFO blocks until something writes to it: loading hung forever. An alarm stops the
    wait, so the old behaviour fails this test instead of hanging it."""
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)

    def give_up(signum, frame):
        raise TimeoutError(f"opening {shard.name} blocked")
    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        with pytest.raises(EchoXError, match=f"{shard.name}: not a regular file"):
            Checkpoint(model_copy)
        with pytest.raises(EchoXError, match=f"{shard.name}: not a regular file"):  # named as the checkpoint
            Checkpoint(shard)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("layers", [1, 3, 10**6])
def test_llm_depth_disagreeing_with_the_weights_is_named_first(model_copy, layers):
    """The whole LLM layout was built before the first missing key was named: 34 s and 2 GB for 1e6."""
    _edit_json(model_copy / "config.json", lambda raw: raw.__setitem__("num_hidden_layers", layers))
    with pytest.raises(EchoXError, match=f"config.json: num_hidden_layers is {layers}, but the weights hold 2 LLM "
                                         "layers"):
        open_model_folder(model_copy)


def test_a_fingerprint_names_the_weights_not_their_place(tmp_path):
    """Training resumes only onto the weights it started from (train/loop.py): a moved copy is the
    same model, one changed weight is another, in a small file (read whole) and a large one (read in
    evenly spaced pieces, each of which counts)."""
    small = {"a": torch.arange(12, dtype=torch.float32).view(3, 4)}
    large = {"b": torch.zeros(5 * 1024 * 1024, dtype=torch.float32)}  # 20 MiB: sampled, not read whole
    for name, tensors in (("small", small), ("large", large)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        before = Checkpoint(tmp_path / f"{name}.safetensors").fingerprint()
        moved = tmp_path / "moved" / f"{name}.safetensors"
        moved.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / f"{name}.safetensors", moved)
        assert Checkpoint(moved).fingerprint() == before
        changed = {key: value.clone() for key, value in tensors.items()}
        next(iter(changed.values())).view(-1)[-1] = 1.0  # the last value: in the file's last piece
        save_file(changed, str(moved))
        assert Checkpoint(moved).fingerprint() != before, name
