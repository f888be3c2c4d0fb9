"""Self-speculative decoding (TriForce): a draft that is the target model over a small draft
cache in fast memory, verified by the target over the full KV with speculative sampling.

``draft.py``: the draft cache (chosen from the full KV by a sparse policy, then every verified
token). ``speculator.py``: one speculation round for a batch — draft, verify, accept, commit.
"""
