"""Training computes what inference computes: the same decoder outputs, the same h_t pairing, the
same echo-decoder layout, and a saved folder that holds exactly the weights trained."""

import dataclasses
import shutil

import pytest
import torch

from echox.adapter import load_adapter
from echox.audio import write_wav
from echox.checkpoint import open_model_folder, resolve_whisper
from echox.cli import demo_question
from echox.config import LlamaConfig
from echox.echo import ECHO_PREFIX, echo_layout, load_echo_decoder
from echox.engine import load
from echox.llama import LlamaBody, load_lm
from echox.sampling import GREEDY
from echox.train import stages
from echox.train.echo_trainer import TrainableEchoDecoder
from echox.train.export import adapter_tensors, echo_tensors, llm_tensors, save_model
from echox.train.lora import LoRALinear, add_lora
from echox.train.manifest import Example, write_manifest
from echox.train.speech_to_text import SpeechToText, prepare_turns
from echox.train.stages import EchoStage, SpeechToTextStage, StageOptions, pseudo_labels
from echox.vocoder import convert_fairseq_vocoder, load_vocoder
from echox.whisper import load_whisper

CFG = LlamaConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                  vocab_size=50, max_position_embeddings=64)


@pytest.fixture(scope="module")
def body():
    torch.manual_seed(0)
    return LlamaBody(CFG)


def cached_prefill(body, x, key_valid):
    """The engine's path: one sequence [T, H] written into a fresh KV cache."""
    body.setup_cache(1, 16)
    positions = torch.arange(len(x))[None]
    out = body(x[None], positions, key_valid[None], kv_len=len(x))[0]
    for layer in body.layers:
        layer.attention.cache = None  # back to training mode
    return out


def test_sequence_forward_equals_cached_prefill_and_padding_never_mixes(body):
    gen = torch.Generator().manual_seed(1)
    short, long = torch.randn(5, 32, generator=gen), torch.randn(8, 32, generator=gen)
    short_valid = torch.tensor([True, True, False, True, True])  # a masked (eot) key, as prompts have
    long_valid = torch.ones(8, dtype=torch.bool)
    x = torch.zeros(2, 8, 32)
    x[0, :5], x[1] = short, long
    key_valid = torch.zeros(2, 8, dtype=torch.bool)
    key_valid[0, :5], key_valid[1] = short_valid, long_valid
    with torch.no_grad():
        batched = body.forward_sequences(x, key_valid)
        checkpointed = body.forward_sequences(x, key_valid, checkpointed=True)
        torch.testing.assert_close(batched[0, :5], cached_prefill(body, short, short_valid), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1], cached_prefill(body, long, long_valid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(checkpointed, batched)


def test_checkpointing_gives_the_same_gradients(body):
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    key_valid = torch.ones(2, 6, dtype=torch.bool)
    grads = []
    for checkpointed in (False, True):
        body.zero_grad()
        body.forward_sequences(x, key_valid, checkpointed).square().sum().backward()
        grads.append([p.grad.clone() for p in body.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_lora_starts_at_the_base_and_merges_only_its_targets():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 64, bias=False)
    lora = LoRALinear(base, [("q", 32), ("k", 16), ("v", 16)], {"q", "v"}, rank=4, alpha=8.0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at the start
    with torch.no_grad():
        for up in lora.up.values():
            up.normal_()
    merged = lora.weight
    torch.testing.assert_close(lora(x), x @ merged.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[32:48], base.weight[32:48])  # k rows untouched
    assert not torch.allclose(merged[:32], base.weight[:32]) and not torch.allclose(merged[48:], base.weight[48:])
    assert set(lora.up) == {"q", "v"} and not base.weight.requires_grad


def test_lora_adds_alpha_over_rank_times_b_a():
    """W x + (alpha / r) B A x on the adapted blocks, in the forward and in the merged weight."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 64, bias=False)
    lora = LoRALinear(base, [("q", 32), ("k", 16), ("v", 16)], {"q", "v"}, rank=4, alpha=8.0)
    with torch.no_grad():
        for up in lora.up.values():
            up.normal_()
    x = torch.randn(3, 32)
    a, b = lora.down, lora.up
    update = torch.cat([x @ a["q"].T @ b["q"].T, torch.zeros(3, 16), x @ a["v"].T @ b["v"].T], dim=-1)
    expected = base(x) + (8.0 / 4) * update
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ lora.weight.T, expected, rtol=1e-5, atol=1e-5)


def trainable_decoder(folder, aligner_dropout: float = 0.0) -> TrainableEchoDecoder:
    cfg, tokenizer = folder.config.echo, folder.tokenizer
    tensors = folder.weights.take(echo_layout(cfg), "echo decoder", torch.float32, strip=ECHO_PREFIX)
    return TrainableEchoDecoder(cfg, tokenizer.echo_prefixes(), tokenizer.eot, tensors, aligner_dropout=aligner_dropout)


def test_trainable_echo_decoder_takes_the_bodys_tensors_out_of_its_dict(tiny_model_dir):
    """The separate q/k/v and gate/up go as their fused copies are made (they stayed in the caller's
    dict beside them, for as long as a training stage kept it: ~150 MB in fp32 at EchoX-8B's decoder)."""
    folder = open_model_folder(tiny_model_dir)
    cfg, tokenizer = folder.config.echo, folder.tokenizer
    tensors = folder.weights.take(echo_layout(cfg), "echo decoder", torch.float32, strip=ECHO_PREFIX)
    TrainableEchoDecoder(cfg, tokenizer.echo_prefixes(), tokenizer.eot, tensors)
    assert not [key for key in tensors if key.startswith("model.layers.") or key == "model.norm.weight"]


def test_trainable_echo_decoder_reproduces_greedy_decoding(tiny_model_dir):
    folder = open_model_folder(tiny_model_dir)
    engine_decoder = load_echo_decoder(folder)
    trainer = trainable_decoder(folder)
    segment = torch.randn(6, folder.config.echo.llm_hidden_size, generator=torch.Generator().manual_seed(2))
    units = list(engine_decoder.generate(segment, max_units=12))
    with torch.no_grad():
        out = trainer([trainer.aligner_mlp(segment)], [units])
    # The unit head ranks eot and the unit rows only: the trainer must pick what inference picked.
    restricted = engine_decoder.unit_head_ids[out.logits[0][:, engine_decoder.unit_head_ids].argmax(-1)]
    assert restricted[:len(units)].tolist() == units


def test_pseudo_labels_cut_at_the_limit_teach_no_eot(tiny_model_dir, tmp_path):
    """A decode that ran out of budget is not a finished answer: training must not teach eot there."""
    folder = open_model_folder(tiny_model_dir)
    options = StageOptions(manifest=tmp_path / "m.jsonl", model=tiny_model_dir, out=tmp_path, max_units=3)
    [cut] = pseudo_labels(folder, [Example(1, tmp_path / "q.wav", "a", "A long answer.")], options)
    assert len(cut.units) == 3 and not cut.ended
    trainer = trainable_decoder(folder)
    slot = torch.randn(5, folder.config.echo.llm_hidden_size)
    with torch.no_grad():
        assert trainer([slot], [cut.units], [cut.ended]).targets[0].tolist() == cut.units
        assert trainer([slot], [cut.units]).targets[0].tolist() == cut.units + [folder.tokenizer.eot]


def test_the_aligner_drops_out_only_while_training(tiny_model_dir):
    folder = open_model_folder(tiny_model_dir)
    plain, dropping = trainable_decoder(folder), trainable_decoder(folder, aligner_dropout=0.5)
    h = torch.randn(8, folder.config.echo.llm_hidden_size)
    with torch.no_grad():
        assert not torch.equal(dropping.aligner_mlp(h), plain.aligner_mlp(h))
        assert torch.equal(dropping.eval().aligner_mlp(h), plain.aligner_mlp(h))


def test_hidden_states_pair_with_the_tokens_they_predict(tiny_model_dir, tmp_path):
    """The engine answers greedily; teacher-forcing that answer, every h_t the trainer pairs with token
    t has t as its argmax, and the speech rows are the engine adapter's."""
    question = tmp_path / "q.wav"
    write_wav(question, demo_question(1.0))
    session = load(tiny_model_dir).session(sampling=GREEDY, max_new_tokens=10, max_units=4)
    tokens = [e for e in session.respond(audio=question)][-1].trace["tokens"]
    folder = open_model_folder(tiny_model_dir)
    whisper = load_whisper(resolve_whisper(folder, None))
    turn = prepare_turns([Example(1, question, "a", "b")], folder.tokenizer, whisper)[0]
    turn = dataclasses.replace(turn, response=tuple(tokens) + (folder.tokenizer.eot,))
    adapter = load_adapter(folder.weights, folder.config.adapter)
    model = SpeechToText(load_lm(folder.weights, folder.config.llm, torch.float32, "cpu"), adapter, folder.tokenizer)
    with torch.no_grad():
        out = model([turn])
        speech, _ = model.listen(turn.frames)
        torch.testing.assert_close(speech, adapter(turn.frames)[0])
        assert model.lm.lm_head(out.hidden[0]).argmax(-1).tolist() == tokens
    assert out.text_ids[0].tolist() == tokens and out.text_mask.all()


def test_saving_untrained_modules_rewrites_the_source_exactly(tiny_model_dir, tmp_path):
    folder = open_model_folder(tiny_model_dir)
    cfg, weights, tokenizer = folder.config, folder.weights, folder.tokenizer
    lm = load_lm(weights, cfg.llm, torch.float32, "cpu")
    add_lora(lm, {"q", "v", "down"}, rank=2, alpha=4.0)  # B = 0: merged weights equal the loaded ones
    tensors = weights.take(echo_layout(cfg.echo), "echo decoder", torch.float32, strip=ECHO_PREFIX)
    decoder = TrainableEchoDecoder(cfg.echo, tokenizer.echo_prefixes(), tokenizer.eot, tensors)
    trained = llm_tensors(lm) | adapter_tensors(load_adapter(weights, cfg.adapter), folder) | echo_tensors(decoder)
    assert set(trained) < set(weights.keys())
    out = tmp_path / "model"
    save_model(out, folder, trained, resolve_whisper(folder, None))
    saved = open_model_folder(out)  # the engine's own loader accepts it
    assert sorted(saved.weights.keys()) == sorted(weights.keys())
    for key in weights.keys():
        torch.testing.assert_close(saved.weights.get(key), weights.get(key), rtol=0, atol=0, msg=key)
    assert resolve_whisper(saved, None) == resolve_whisper(folder, None)
    assert (out / "g_00500000").read_bytes() == (tiny_model_dir / "g_00500000").read_bytes()


def test_stage_three_puts_its_losses_together_as_the_spec_says(tiny_model_dir, tmp_path):
    """SPEC §9 by hand on a batch of two: CTC of the adapter's CTC head against the transcript with
    <audio_patch> as the blank, L_S2T = CE + 0.3 CTC, L_den and L_echo from each example alone,
    lambda = min(1, 0.2 L_echo / L_den), L_T2U =
    L_echo + lambda L_den, and the total's branch on L_S2T (random weights: L_S2T > 1)."""
    folder = open_model_folder(tiny_model_dir)
    tok = folder.tokenizer
    examples = []
    for line, seconds in ((1, 1.0), (2, 1.5)):
        write_wav(tmp_path / f"q{line}.wav", demo_question(seconds))
        examples.append(Example(line, tmp_path / f"q{line}.wav", "what was said", "An answer, then more."))
    turns = prepare_turns(examples, tok, load_whisper(resolve_whisper(folder, None)))
    options = StageOptions(manifest=tmp_path / "m.jsonl", model=tiny_model_dir, out=tmp_path, max_units=6)
    labels = pseudo_labels(folder, examples, options)
    speech = SpeechToText(load_lm(folder.weights, folder.config.llm, torch.float32, "cpu"),
                          load_adapter(folder.weights, folder.config.adapter), tok)
    decoder = trainable_decoder(folder)
    with torch.no_grad():
        got = EchoStage(speech, decoder)(list(zip(turns, labels)))
        logits = torch.stack([speech.listen(turn.frames)[1] for turn in turns]).float()  # [B, 750, V]
    transcripts = [torch.tensor(turn.transcript) for turn in turns]
    ctc = torch.nn.functional.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1), torch.nn.utils.rnn.pad_sequence(transcripts, batch_first=True),
        torch.full((2,), logits.shape[1]), torch.tensor([len(t) for t in transcripts]), blank=tok.audio_patch,
        zero_infinity=True)
    torch.testing.assert_close(got["ctc"], ctc)
    torch.testing.assert_close(got["s2t"], got["cross_entropy"] + 0.3 * ctc)
    with torch.no_grad():
        stage_one = SpeechToTextStage(speech)(turns)  # stage I's loss is the same L_S2T
    torch.testing.assert_close(stage_one["loss"], got["s2t"])
    # L_den: per example, the sum over its text slots of 1 - cos(aligner_MLP(h_t), E_text[token t]);
    # L_echo: per example, the mean CE of the teacher-forced units (+ eot when the label ended); both
    # averaged over the batch. Each example alone, so no padding or batching is shared with the stage.
    denoising, echo = [], []
    with torch.no_grad():
        for turn, label in zip(turns, labels):
            alone = speech([turn])
            denoised = decoder.aligner_mlp(alone.hidden[0])
            cos = torch.nn.functional.cosine_similarity(denoised, decoder.text_embeddings[alone.text_ids[0]], dim=-1)
            denoising.append((1 - cos).sum())
            logits = decoder([denoised], [label.units], [label.ended]).logits[0]
            echo.append(torch.nn.functional.cross_entropy(logits, torch.tensor(label.units + [tok.eot] * label.ended)))
    torch.testing.assert_close(got["denoising"], torch.stack(denoising).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["echo"], torch.stack(echo).mean(), rtol=1e-4, atol=1e-5)
    echo, denoising = got["echo"], got["denoising"]
    weight = 0.2 * echo / denoising if denoising > 0.2 * echo else torch.tensor(1.0)
    torch.testing.assert_close(got["lambda"], weight)
    torch.testing.assert_close(got["t2u"], echo + weight * denoising)
    assert got["s2t"] > 1
    torch.testing.assert_close(got["loss"], got["s2t"] + got["t2u"])


def test_export_keeps_a_converted_vocoder(tiny_root, tmp_path):
    """Only g_* files were copied: a folder whose vocoder is a converted vocoder.safetensors was
    exported with vocoder_config.json but no vocoder weights."""
    shutil.copytree(tiny_root, tmp_path / "root")
    source = tmp_path / "root" / "EchoX-tiny"
    convert_fairseq_vocoder(source, source / "vocoder.safetensors")
    (source / "g_00500000").unlink()
    folder = open_model_folder(source)
    save_model(tmp_path / "model", folder, {}, resolve_whisper(folder, None))
    assert (tmp_path / "model" / "vocoder.safetensors").read_bytes() == (source / "vocoder.safetensors").read_bytes()
    load_vocoder(tmp_path / "model")


def test_a_trained_stage_three_is_exported_as_trained(tiny_model_dir, tmp_path, monkeypatch):
    """Train stage III a few steps, save it, and reload the folder with the engine's loaders: the LLM
    (LoRA merged), the adapter and the echo decoder give the trained module's states and logits, and
    each of them differs from the source's (an export that dropped one kept the source's)."""
    records = []
    for i, seconds in enumerate((0.8, 1.0, 1.2, 1.4)):
        write_wav(tmp_path / f"q{i}.wav", demo_question(seconds))
        records.append({"audio": f"q{i}.wav", "transcript": "what was said", "response": f"Answer number {i}."})
    write_manifest(tmp_path / "train.jsonl", records)
    built = {}

    def build(run, options):
        built["job"] = stages.build_stage3(run, options)
        return built["job"]
    monkeypatch.setitem(stages.BUILDERS, "stage3", build)
    stages.run_stage("stage3", StageOptions(manifest=tmp_path / "train.jsonl", model=tiny_model_dir, out=tmp_path / "out",
                                            steps=3, batch_size=2, lr=1e-2, max_units=6, lora_rank=2,
                                            aligner_dropout=0.0))
    source, saved = open_model_folder(tiny_model_dir), open_model_folder(tmp_path / "out" / "model")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.mm_projector1.weight", ECHO_PREFIX + "adapter.weight"):
        assert not torch.allclose(saved.weights.get(key), source.weights.get(key)), key
    reloaded = EchoStage(SpeechToText(load_lm(saved.weights, saved.config.llm, torch.float32, "cpu"),
                                      load_adapter(saved.weights, saved.config.adapter), saved.tokenizer),
                         trainable_decoder(saved))
    turns, labels = zip(*built["job"].items)
    with torch.no_grad():
        trained_out, _, trained_units = built["job"].module.eval().unit_logits(list(turns), list(labels))
        out, _, units = reloaded.eval().unit_logits(list(turns), list(labels))
    torch.testing.assert_close(out.hidden, trained_out.hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cross_entropy, trained_out.cross_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(units.logits, trained_units.logits, rtol=1e-4, atol=1e-5)
