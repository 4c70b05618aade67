"""Many conversations per engine: continuous batching of the LLM, echo decoder and vocoder.

  text_batcher.py     every active turn of every session is one row of one LLM decode step; a
                      turn joins after its own prefill (run between two steps) and leaves at eot;
  echo_batcher.py     the segments being spoken decode together, one row each, the same way;
  vocoder_batcher.py  the vocoder pushes of all streams waiting at once run as one batched push;
  slots.py            the fixed KV slots of the two decoders, with which conversation holds which;
  worker.py           the thread that runs one such loop and hands each request its results.
An engine loaded with `max_batch` (echox.engine.load) routes every session's turns through these.
"""
