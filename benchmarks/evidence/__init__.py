"""The experiments behind ``docs/analysis.md``, one module each.

=================  ===========================================================================
``meta_learning``  1. gradient dropout in MAML's inner loop (the published setting)
``meta_learning_closer``
                   1b. MAML closer to the published code: validation checkpoint, first order,
                   both Gaussian forms, constant and linear rates
``mechanism``      2. controls: step size, batch size, plain SGD, isotropic noise, full batch
``label_noise``    3. symmetric label noise: accuracy and memorization over time
``tuned``          4. every method tuned on a validation split, then fresh seeds
``masking``        5. where the mask goes: gradient or update, element, row or tensor
``language_model`` 6. a character GRU that overfits an in-domain training text
``transformer_lm`` 7. a character-level transformer on 200,000 characters, two lengths
``motion``         how far coordinates whose gradient was dropped still move
``controls``       Dropout and weight-decay arms where a null lacked them; the calibration of
                   every claimed null against its setting's positive control
=================  ===========================================================================

Shared pieces: ``data`` (digits, episodes, text), ``models``, ``training`` (the digits loop),
``stats`` (paired tests), ``report`` (rows and tables), ``figures`` and ``runner``. Run
``python -m benchmarks.evidence --help`` from the repository root.
"""
