"""Peers for `python -m bench.compare`: the same model, tokenizer and ORT settings behind other serving stacks.

- `naive_server`: one `InferenceSession.run` per request under a plain `grpc.server(ThreadPoolExecutor)`;
- `ray_peer`: Ray Serve's gRPC proxy in front of a deployment that batches with `@serve.batch`.

Both reuse `model_format.features.FeatureEncoder` and `bench.engine.load_engine`, so any difference in the
comparison comes from the serving stack, not from the model inputs or the session options.
"""
