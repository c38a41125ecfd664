"""The Hydra config of ``cellrcnn predict``, apart from the training configs: their config groups
(``model``, ``data``, ...) would capture ``model=nuclei``, prediction's shipped-model option."""
