"""The training job: replay of reinforced records into student batches (`data`), and the Ray Train wiring.

Only this package and `reinforce` import Ray; `data` stays plain Python/numpy/torch so it is unit-tested without a
Ray runtime and used as Ray Data ``map_batches`` UDFs by the wiring.
"""
