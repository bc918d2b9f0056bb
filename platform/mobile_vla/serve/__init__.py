"""Ray Serve application: HTTP ingress, TensorRT / ONNX policy deployments, memory tokens, auth,
metrics, the feedback sink and the robot client. `build_app` lives in `mobile_vla.serve.app`.

Light at import: ray, fastapi and onnxruntime load in the submodules that need them.
"""
