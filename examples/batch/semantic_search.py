"""A small semantic search over `llmops batch --task embed` results.

    llmops batch examples/batch/docs.jsonl -o out/docs --model all-minilm-l6-v2
    llmops batch examples/batch/queries.jsonl -o out/queries --model all-minilm-l6-v2
    python examples/batch/semantic_search.py out/docs out/queries

The vectors are normalized (output.normalize defaults to true), so a dot product is the cosine similarity.
"""

import sys

import numpy as np
import pandas as pd

docs = pd.read_parquet(f"{sys.argv[1]}/results").sort_values("row")
queries = pd.read_parquet(f"{sys.argv[2]}/results").sort_values("row")
scores = np.stack(queries.embedding) @ np.stack(docs.embedding).T
for query, row in zip(queries.prompt, scores):
    best = row.argsort()[::-1][:2]
    print(f"{query}\n" + "".join(f"  {row[i]:.3f}  {docs.prompt.iloc[i]}\n" for i in best))
