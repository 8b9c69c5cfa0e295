"""Figures of runs and sweeps (:mod:`.plots`), the sweep report from MLflow (:mod:`.report`)."""
