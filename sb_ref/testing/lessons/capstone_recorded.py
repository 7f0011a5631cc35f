"""The capstone's reference results (lesson 09), one entry per device, each from a real run of its solution
notebook: written by `python -m sb_ref.testing.lessons.record_capstone`, not by hand."""

RECORDED = {'cpu': {'accuracy': {'softmax_rope': [1.0, 0.9939, 0.8212, 0.6405], 'stick_breaking': [1.0, 1.0, 1.0, 1.0]},
         'attention': '04_tiles',
         'device': 'cpu',
         'lengths': [64, 128, 256, 512],
         'load': [0.77, 0.83],
         'seconds': 21.0,
         'settings': {'batch': 32, 'dim': 64, 'lr': 0.003, 'num_heads': 4, 'num_layers': 2, 'steps': 200},
         'threads': 1}}
