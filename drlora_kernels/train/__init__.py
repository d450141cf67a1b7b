"""The application layer: corpora, tiny MoE models, training loops, reports (``drlora`` CLI).

* :mod:`.data` - local corpora, byte tokens, deterministic blocks and batches;
* :mod:`.models` - tiny OLMoE / Qwen2-MoE / Mixtral configs, local checkpoints;
* :mod:`.loop` - pre-training, DR-LoRA fine-tuning, evaluation;
* :mod:`.masked` - the paper's masked ``r_max`` computation (speed comparison);
* :mod:`.memory` - peak memory of a phase;
* :mod:`.report` - table, ``results.json``, plots;
* :mod:`.pipeline` - the comparison run behind ``drlora demo`` / ``train`` / ``quality``.
"""
