"""Understudy's runtime: reading MoE checkpoints (families, expert store) and executing them with offloaded experts.

`runtime.policy` is pure Python (no torch), so the compiler can import the decision rules without torch;
`Runtime` is imported lazily."""


def __getattr__(name):
    if name == "Runtime":
        from runtime.runtime import Runtime

        return Runtime
    raise AttributeError(name)


__all__ = ["Runtime"]
