"""Max-activating examples (paper App. I): where in a corpus each SAE latent fires, and how strongly.

    store = build_example_store(lm, {"resid_12": sae}, docs, "runs/examples/examples.sqlite", ExampleConfig())
    store.examples("resid_12", 123, limit=20)   # -> [Example(act, tokens, acts, ...)], milliseconds

One pass over the corpus reads every SAE's site in a single forward (stopping after the last layer
needed) and keeps, for every latent:
  * the top-k examples: the k chunks where the latent's maximum is highest, each centred on that
    maximum (at most one example per chunk, so the top-k are not k neighbouring tokens of one text);
  * a sample of firings in disjoint activation bins of width 0.5 (bin b holds acts in [b/2, (b+1)/2)),
    as in the paper, so the page shows weak as well as strong activations.
Each example keeps a token window (context_before tokens before the firing token, context_after
after) with the latent's activation on every token of the window.

Sampling within a bin is seeded bottom-k ("priority") sampling, the order-free form of reservoir
sampling: every firing gets a pseudo-random key hash(seed, token uid, latent), and a bin keeps the
per_bin firings with the smallest keys. That is a uniform sample without replacement, it is the same
whatever order or chunking the corpus is read in, and a resumed run gives exactly the same store.

Storage is SQLite (stdlib sqlite3). Why: one file that can be copied next to a run; a B-tree index on
(sae, latent, bin, rank) answers "examples for latent i of SAE s" with one index range scan in
about a millisecond without loading the rest (see benchmarks/bench_examples.py); transactions give
resumability for free (each chunk of the corpus is one commit that also records the corpus cursor);
concurrent readers (the viewer's threads) are safe; and it adds no dependency. DuckDB/Parquet are
columnar and shine at scans, not at the point look-ups a feature page needs.

The store is built in `<path>.partial` and renamed to `<path>` when complete (atomic finalisation);
a run that finds a `.partial` made with the same settings continues from its last commit.

Files: config (ExampleConfig), sampling (keys and the candidate pool), schema (the SQLite file and its
commits), build (the pass over the corpus), store (reading: ExampleStore, summarize_store).
"""

from icl_circuits.methods.examples.build import build_example_store
from icl_circuits.methods.examples.config import SCHEMA_VERSION, TOP, ExampleConfig
from icl_circuits.methods.examples.sampling import sample_keys
from icl_circuits.methods.examples.schema import SCHEMA
from icl_circuits.methods.examples.store import Example, ExampleStore, summarize_store

__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "TOP", "Example", "ExampleConfig", "ExampleStore",
    "build_example_store", "sample_keys", "summarize_store",
]  # fmt: skip
