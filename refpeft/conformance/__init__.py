"""The conformance suite: refpeft as an oracle other implementations are checked against.

    catalogue   CASES: every committed case (family, sizes, options, dtype, seed)
    families    how each family draws its inputs and computes expected results and bounds
    exact       ExactArray: refpeft's own functions with correctly rounded reductions (reproducible)
    vectors     the files: NAME.safetensors + NAME.json per case, index.json (conformance/README.md)
    generate    `refpeft conformance generate`
    check       the implementation protocol, pass/fail per result, `refpeft conformance check`
    report      every installed runner on every case, `refpeft conformance report`
    runners     refpeft itself, HF PEFT (torch), bitsandbytes, ONNX Runtime

The committed vectors, their format specification and the findings live in conformance/;
docs/conformance.md explains the design and the measured results.
"""
