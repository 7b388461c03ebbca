"""Reading pool shards inside Ray Data tasks: the datasource (`source`), the decode step (`decode`) and the
duplicate-key pass (`dupes`).

Its own package, apart from `score/`, because a Ray worker that runs one of these imports the package it
lives in: here that is pyarrow, PIL and Ray, while `score/__init__` loads the teacher (torch). Every read
and decode worker of `odsd score` and `odsd distill`'s materialisation would otherwise pay for torch.
Nothing here may import torch (tests/test_score.py::test_pool_reader_does_not_import_torch).
"""
