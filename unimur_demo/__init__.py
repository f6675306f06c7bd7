"""The offline demo: synthetic data, real small backbones, train, evaluate and report end to end
(``python -m unimur_demo.pipeline``, ``./run_demo.sh``). A program beside the library, as
``open_clip_train`` is beside ``open_clip``: it imports ``unimur``, never the other way round."""
