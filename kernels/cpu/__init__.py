"""The native CPU kernels: C sources compiled once per machine (`build`), the one ABI
(`lowrank_cpu.h`) and a ctypes wrapper per source (`gemm`, `attention`, `elementwise`,
`decoder_layer`). They stand in for the Triton kernels on CPUs, where Triton has no backend."""
