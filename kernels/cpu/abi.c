/* The library's own account of its ABI: the constants of lowrank_cpu.h and the layout of its
 * structs, by name, so Python reads them from the library it loaded instead of keeping copies
 * (kernels/cpu/build.py::constant; the struct mirror is checked against these offsets). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lowrank_cpu.h"

#define FIELD(type, field) {#type "." #field, (int64_t)offsetof(type, field)}

static const struct {
    const char *name;
    int64_t value;
} CONSTANTS[] = {
    {"PANEL", PANEL},
    {"MAX_GROUP", MAX_GROUP},
    {"MAX_HEAD_DIM", MAX_HEAD_DIM},
    {"HEAD_DIM_MULTIPLE", HEAD_DIM_MULTIPLE},
    {"LANES", LANES},
    {"VNNI", VNNI},
    {"VNNI_MIN_ROWS", VNNI_MIN_ROWS},
    {"sizeof(cpu_weight)", (int64_t)sizeof(cpu_weight)},
    {"sizeof(cpu_linear)", (int64_t)sizeof(cpu_linear)},
    {"sizeof(cpu_decoder_layer)", (int64_t)sizeof(cpu_decoder_layer)},
    FIELD(cpu_weight, data), FIELD(cpu_weight, scales), FIELD(cpu_weight, bits), FIELD(cpu_weight, group),
    FIELD(cpu_weight, activations),
    FIELD(cpu_linear, weight), FIELD(cpu_linear, down), FIELD(cpu_linear, up), FIELD(cpu_linear, bias),
    FIELD(cpu_linear, rank),
    FIELD(cpu_decoder_layer, q), FIELD(cpu_decoder_layer, k), FIELD(cpu_decoder_layer, v),
    FIELD(cpu_decoder_layer, o), FIELD(cpu_decoder_layer, gate), FIELD(cpu_decoder_layer, up),
    FIELD(cpu_decoder_layer, down), FIELD(cpu_decoder_layer, input_norm), FIELD(cpu_decoder_layer, post_norm),
    FIELD(cpu_decoder_layer, eps), FIELD(cpu_decoder_layer, hidden), FIELD(cpu_decoder_layer, intermediate),
    FIELD(cpu_decoder_layer, num_heads), FIELD(cpu_decoder_layer, num_kv_heads),
    FIELD(cpu_decoder_layer, head_dim), FIELD(cpu_decoder_layer, window),
};

/* The named constant, size ("sizeof(type)") or field offset ("type.field"); -1 for an unknown name. */
int64_t lowrank_cpu_constant(const char *name)
{
    for (size_t i = 0; i < sizeof(CONSTANTS) / sizeof(CONSTANTS[0]); i++)
        if (strcmp(CONSTANTS[i].name, name) == 0) return CONSTANTS[i].value;
    return -1;
}
