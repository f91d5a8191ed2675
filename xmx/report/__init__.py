"""Gather ``results.json`` files into the papers' tables (Markdown, CSV, optional LaTeX) and plots.

    python -m xmx.report outputs/ multirun/2026-01-01/ [--out report] [--seeds 1,2,3] [--param method.lam]
                         [--references my_refs.yaml] [--compare] [--latex] [--no-plots]
    python -m xmx.report outputs/ --format clip_benchmark --out cb/   # LAION CLIP_benchmark JSON + benchmark.csv

Folders are searched recursively for ``results.json`` (a single run, a multirun root, or a tree of them). Which table
a run belongs to follows from its ``protocol``, ``dataset`` and metric names (never from its method), so a new method
shows up without any change here:

- ``fewshot``: ``metrics["test/acc"]`` per dataset × shots;
- ``base2new``: ``metrics["test_base/acc"]`` and ``["test_new/acc"]``; HM is computed here from mean base and new;
- ``domain_shift`` / ``cross_dataset``: ``test/acc`` on the source and ``test_<target>/acc`` per target (domain shift
  when the protocol says so or every target is an ImageNet variant);
- ``glue``: every ``test*/<metric>`` (``val*/`` when the run logged no test metrics) of a GLUE task;
- ``colour``: ``test/acc`` (or ``val/acc``) on MemoryColor / ColorTerms.

Rows are methods (results.json ``method``), split further by experiment, backbone, protocol, and by the config keys
that were swept: keys of the resolved configs that differ between runs sharing method, experiment, dataset, shots and
seed. Cells are mean ± sample std (ddof 1) over seeds; a cell with fewer seeds than expected is marked.
"""

from xmx.report.cli import build_report, main
from xmx.report.gather import SCHEMA, TABLES, dataset_name, find_results, load_runs, observations, swept_keys
from xmx.report.references import compare, load_references
from xmx.report.tables import aggregate, build_tables, latex_table, markdown_table

__all__ = ["SCHEMA", "TABLES", "aggregate", "build_report", "build_tables", "compare", "dataset_name", "find_results",
           "latex_table", "load_references", "load_runs", "main", "markdown_table", "observations", "swept_keys"]
