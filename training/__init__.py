"""Training: the train step, optimizer, data pipeline, checkpoints, metrics, MFU and HF export.

    from training import TrainConfig, Trainer
    trainer = Trainer("runs/tiny", TrainConfig(preset="tiny", steps=200))
    trainer.run()
    trainer.export("runs/tiny-hf")      # serves with Engine.from_pretrained("runs/tiny-hf")

See docs/TRAINING.md.
"""

from training.checkpoint import CheckpointError, Checkpointer
from training.data import DataConfig, DataError, byte_level_tokenizer, pack_documents, prepare_data
from training.export_hf import ExportError, export_hf
from training.optim import OptimConfig, TrainConfigError, make_optimizer
from training.step import TrainState, loss_sums, make_train_step
from training.trainer import TrainConfig, Trainer, TrainingDiverged
