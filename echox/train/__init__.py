"""Echo training (SPEC §9): from a data manifest to a released-layout checkpoint the engine serves.

  manifest.py  the JSONL manifest: one conversation turn a line, clear errors by line number
  batching.py  length-bucketed batches, right padding, the share of each process under torchrun
  units.py     the unit language: frequent-n-gram unit tokens, units <-> tokens, tokenizer.json
  lora.py      low-rank adapters on the LLM's fused projections, merged for saving
  losses.py    every loss term of SPEC §9 as a function of tensors
  speech_to_text.py  stage I's model: cached Whisper frames -> adapter -> LLM (LoRA)
  echo_trainer.py    the echo decoder in trainable form: teacher-forced logits, text or h_t slots
  loop.py      the optimisation loop: DDP, metrics.jsonl, progress bar, resumable state
  export.py    the released layout on disk (config, shards, tokenizer, vocoder), LoRA merged
  stages.py    stage I (speech -> text), II (text -> units), III (echo)
  stand_in_units.py  the demo's stand-in for HuBERT units: k-means of 20 ms log-mel frames
  demo.py      a synthetic task (espeak-ng speech, stand-in units) run through all three stages
  cli.py       `echox train stage1|stage2|stage3|demo`
"""
