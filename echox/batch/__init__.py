"""Many conversations per engine: continuous batching of the LLM and the echo decoder.

  text_batcher.py  every active turn of every session is one row of one LLM decode step; a turn
                   joins after its own prefill (run between two steps) and leaves at eot;
  echo_batcher.py  the segments being spoken decode together, one row each, the same way;
  slots.py         the fixed KV slots both use, with which conversation holds which;
  worker.py        the thread that runs one such loop and hands each request its results.
An engine loaded with `max_batch` (echox.engine.load) routes every session's turns through
these; the vocoder needs no batcher: its weights are read-only and each stream owns its state.
"""
