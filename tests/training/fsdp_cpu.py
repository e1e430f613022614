"""`python tests/training/fsdp_cpu.py train ... --strategy fsdp_cpu`: real FSDP on CPU, for tests.

Lightning 2.6 refuses `--strategy fsdp` without a GPU, and torch's FSDP needs two CPU
adaptations, both made here and nothing else: an explicit `device_id=cpu` (else FSDP
looks for an accelerator) and full state dicts gathered without `offload_to_cpu`
(offloading tensors that are already on the CPU crashes the process). Sharding, the
gather in `strategy.lightning_module_state_dict()`, checkpoints and the launcher are
Lightning's own. Run as a script: Lightning re-executes it for the other ranks.
"""

from __future__ import annotations

import torch
from pytorch_lightning.strategies import FSDPStrategy, StrategyRegistry
from pytorch_lightning.strategies import fsdp as lightning_fsdp


class CpuFSDP(FSDPStrategy):
    strategy_name = "fsdp_cpu"

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def _full_state_dict_context(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(
            offload_to_cpu=False, rank0_only=rank0_only
        ),
    )


if __name__ == "__main__":
    lightning_fsdp._get_full_state_dict_context = _full_state_dict_context
    StrategyRegistry.register("fsdp_cpu", CpuFSDP, description="FSDP on CPU (tests only)")
    from convcli.cli.app import main

    main()
