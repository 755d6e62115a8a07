"""memedit.export: ship a (sanitized) pipeline to ONNX Runtime, with parity and audit proven.

Modules: ``onnx`` (export driven by Optimum), ``audit`` (zeroed weights still zero in the
graph), ``parity`` (ONNX Runtime vs PyTorch, per component and per image), ``runtime``
(execution provider choice, Optimum's ORT pipeline, generation), ``api`` (export/verify
orchestration), ``cli`` (click commands). Import the submodules; this package stays light.
"""
