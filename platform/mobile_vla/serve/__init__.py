"""Ray Serve application: HTTP ingress (routes, request checks, batch router, alias watcher, shadow),
TensorRT / ONNX policy deployments, memory tokens, auth, metrics and the feedback sink. `build_app`
lives in `mobile_vla.serve.app`; the robot client is its own package,
`mobile_vla_client` (client/ in the repository).

Light at import: ray, fastapi and onnxruntime load in the submodules that need them.
"""
