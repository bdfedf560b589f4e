"""vlmzoo's lab: what compares and explains the strategies, outside the library.

* :mod:`vlmzoo_lab.tinyworld`: the synthetic tiny world (data, tokenizer, tiny CLIP + Llama) and
  its ``${tiny_world.FIELD}`` config variables (entry point ``vlmzoo.config_variables``);
* :mod:`vlmzoo_lab.study`, :mod:`~vlmzoo_lab.study_report`, :mod:`~vlmzoo_lab.study_claims`: the
  comparison study (``scripts/compare.py``), its tables, plots and claims;
* :mod:`vlmzoo_lab.benchmark`, :mod:`~vlmzoo_lab.llava_vs_transformers`: costs
  (``scripts/benchmark.py``);
* :mod:`vlmzoo_lab.analysis`: declared strategy extras per question type (``scripts/strategy_extras.py``);
* :mod:`vlmzoo_lab.visualize`, :mod:`~vlmzoo_lab.demo`, :mod:`~vlmzoo_lab.demo_app`: attention maps
  and the web demo.

The lab imports the library (``vlmzoo``, the strategies are found through its registry); the
library never imports the lab (``tests/test_import_graph.py``).
"""
