"""Stages: small objects with one method, ``process(tile)``, composed by the pipeline."""

from onboard.runtime.stages.cloud import CloudGate, CloudStage, CloudVerdict

__all__ = ["CloudGate", "CloudStage", "CloudVerdict"]
