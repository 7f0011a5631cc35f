"""Lesson 02's expected error table, from a real run of sb_ref: written by
`python -m sb_ref.testing.lessons.expected --record` (see sb_ref/testing/lessons/expected.py), not by hand."""

RECORDED = {'recorded': {'command': 'python -m sb_ref.testing.lessons.expected --record',
              'when': '2026-12-04 21:12 UTC',
              'torch': '2.13.0+cpu',
              'python': '3.11.7',
              'machine': 'x86_64',
              'threads': 2},
 'inputs': {'regimes': ('random', 'long', 'saturated'),
            'dtypes': ('float64', 'float32', 'bfloat16'),
            'B': 1,
            'Hq': 2,
            'T': 512,
            'D': 32},
 'lesson02_error_table': [{'regime': 'random', 'dtype': 'float64', 'stable': 0.0, 'linear': 1.86e-16},
                          {'regime': 'random', 'dtype': 'float32', 'stable': 6.5e-08, 'linear': 7.2e-08},
                          {'regime': 'random', 'dtype': 'bfloat16', 'stable': 0.00165, 'linear': 0.00306},
                          {'regime': 'long', 'dtype': 'float64', 'stable': 0.0, 'linear': 2.94e-15},
                          {'regime': 'long', 'dtype': 'float32', 'stable': 1.02e-06, 'linear': 1.15e-06},
                          {'regime': 'long', 'dtype': 'bfloat16', 'stable': 0.00165, 'linear': 0.113},
                          {'regime': 'saturated', 'dtype': 'float64', 'stable': 0.0, 'linear': 3.27e-16},
                          {'regime': 'saturated', 'dtype': 'float32', 'stable': 1.07e-07, 'linear': 1.06e-07},
                          {'regime': 'saturated', 'dtype': 'bfloat16', 'stable': 0.00126, 'linear': 0.00196}]}
