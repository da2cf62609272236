"""rlhf_utils.processes: the DeepSpeed settings a training loop relies on, whatever the launcher's config file says,
and the frozen models without DeepSpeed. The launches themselves, end to end: tests/test_ppo_rlhf.py and
docs/scale_out.md."""

from types import SimpleNamespace

import torch

from rlhf_utils.processes import configure_deepspeed, prepare_frozen


def deepspeed_accelerator(config: dict, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_configure_deepspeed_overrides_the_config_files_batch_sizes_and_clipping():
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 16,
        "zero_optimization": {"stage": 2},
    }
    assert configure_deepspeed(deepspeed_accelerator(config), 4, 8, 1.0) == 2
    assert config == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 8,
        "gradient_clipping": 1.0,
        "train_batch_size": 64,  # 4 x 8 x 2 processes
        "zero_optimization": {"stage": 2},
    }


def test_configure_deepspeed_under_zero3_gathers_weights_to_save_and_none_clips_nothing():
    config = {"zero_optimization": {"stage": 3}}
    assert configure_deepspeed(deepspeed_accelerator(config, processes=1), 2, 1, None) == 3
    assert config["gradient_clipping"] == 0.0
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_prepare_frozen_without_deepspeed_is_the_model_itself_on_the_device():
    model = torch.nn.Linear(2, 2)
    assert prepare_frozen(model, SimpleNamespace(device=torch.device("cpu")), 4, False, None) is model
