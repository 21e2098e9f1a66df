"""A tiny ExCB configuration for end-to-end tests through Ray (seconds per epoch on 2 CPUs)."""

TINY = ["model.convnet_widths=[8,16]", "model.projector_hidden=64", "model.predictor_hidden=64",
        "model.num_prototypes=16", "augment.num_local=2", "augment.local_size=12", "train.batch_size=64",
        "train.cpus_per_worker=1", "train.torch_threads=1", "method.kmeans_samples=256", "method.kmeans_iters=5",
        "optim.warmup_epochs=0.5", "eval.epoch_knn_train=256", "eval.epoch_knn_test=128",
        "train.log_every_steps=0"]
