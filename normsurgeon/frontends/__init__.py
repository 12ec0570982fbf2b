"""Graph front ends other than ``nn.Module``: each reads facts from its own graph for the one
fold planner (:mod:`normsurgeon.rules.plan`) and writes the decisions back.

* :mod:`.exported`: ``torch.export.ExportedProgram`` (training IR and core ATen).
"""
