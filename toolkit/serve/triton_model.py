"""The Triton python-backend model that serves a toolkit engine (copied into a repository as ``1/model.py``).

It runs inside Triton's python stub, not in the toolkit's process: it reads what to load from the model's
``config.pbtxt`` parameters, loads it with :func:`toolkit.load` on the instance's device (one instance group
per GPU), and answers each batch the dynamic batcher hands it with one engine call. Every request is
re-checked by the toolkit's binder (``cast="none"``: the server already refused datatypes its config does not
declare, and nothing converts silently on this side), so a raw client cannot get a result for a tensor the
engine would misread. Outputs are checked for shape before they are answered.

Tensors cross the stub by DLPack (``Tensor.to_dlpack`` / ``Tensor.from_dlpack``), never through numpy: the stub's
numpy path answers with *empty* output contents and no error when numpy >= 2 is in its environment (nvidia-pytriton
0.7's stub), while DLPack carries the same bytes whatever numpy is installed. Triton hands the inputs on the host;
they are moved to the engine's device (a GPU instance's engine refuses host tensors, rightly, in the binder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils  # provided by Triton's python backend


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import torch

        import toolkit

        config = json.loads(args["model_config"])
        params = _parameters(config)
        source = params["source"]
        here = Path(args["model_repository"]) / args["model_version"]
        if params.get("source_in_version") == "1":
            source = str(here / source)
        device = params.get("device") or "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.engine = toolkit.load(source, backend=params.get("backend") or None, device=device, cast="none")
        declared = toolkit.Signature.from_json(params["rtdetr_deploy_signature"])
        mine = {t.name: t.dtype for t in self.engine.signature.inputs + self.engine.signature.outputs}
        theirs = {t.name: t.dtype for t in declared.inputs + declared.outputs}
        if mine != theirs:
            raise pb_utils.TritonModelException(f"{source}: the engine's I/O {mine} is not the repository's {theirs}; "
                                                "regenerate the repository with rtdetr-deploy export-triton")
        self.inputs = [t.name for t in self.engine.signature.inputs]
        self.outputs = [t.name for t in self.engine.signature.outputs]

    def execute(self, requests: list[Any]) -> list[Any]:
        """One engine call for the whole dynamic batch; a request that fails the binder fails alone."""
        from toolkit.errors import ToolkitError

        feeds, answers, sizes = [], [None] * len(requests), []
        for i, request in enumerate(requests):
            try:
                one = {}
                for name in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ToolkitError(f"missing input {name}")
                    one[name] = self.torch.from_dlpack(tensor.to_dlpack()).to(self.engine.device)  # Triton hands CPU tensors
                self.engine.binder.bind(one)  # the same checks as the client's: dtype, rank, fixed dims, values
                feeds.append((i, one))
                sizes.append(int(one[self.inputs[0]].shape[0]))
            except (ToolkitError, ValueError, KeyError) as e:
                answers[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"refused: {e}"))
        if feeds:
            try:
                batch = {n: self.torch.cat([one[n] for _, one in feeds]) for n in self.inputs}
                out = self.engine.infer(batch)
                offset = 0
                for (i, _), n in zip(feeds, sizes):
                    tensors = []
                    for name in self.outputs:
                        part = out[name][offset:offset + n].detach().cpu().contiguous()
                        if tuple(part.shape[:1]) != (n,) or part.numel() == 0:
                            raise RuntimeError(f"output {name} has shape {list(part.shape)} for a batch of {n}")
                        tensors.append(pb_utils.Tensor.from_dlpack(name, self.torch.utils.dlpack.to_dlpack(part)))
                    answers[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                    offset += n
            except Exception as e:  # the engine failed: every request of this batch gets the error, none a result
                for i, _ in feeds:
                    answers[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {type(e).__name__}: {e}"))
        return answers

    def finalize(self) -> None:
        self.engine.close()
