"""``python -m harness.report``: finished sweeps into paper tables and figures (:mod:`.tables`,
:mod:`.figures`), read from MLflow (:mod:`.load`) and logged back to it as a report run."""
