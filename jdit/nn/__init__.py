"""Building blocks below every model: imported by jdit.models, jdit.text and jdit.eval, importing no other jdit
package.

    matmul     EinsumDense's GEMM (bf16 operands, float32 layer outputs on CPU)
    blockwise  memory-efficient attention in blocks (the CPU default)
    attention  dot-product attention backends (einsum, xla, cudnn, splash, blockwise) and their choice
    posemb     sin-cos tables and 2D RoPE
    layers     dense / norms / modulate / timestep and label embedders / Attention / Mlp, remat policies
"""
