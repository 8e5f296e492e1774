"""Serving several ExpertFlow engines behind one OpenAI-compatible endpoint with Ray Serve.

`routing` holds the replica-choice policies (pure Python), `prediction` the cheap prompt-to-
experts estimate the expert-affinity policy needs, `replica` the Ray Serve deployment that runs
one `vllm serve` engine, `ingress` the HTTP front, and `app` ties them into one application.
"""
