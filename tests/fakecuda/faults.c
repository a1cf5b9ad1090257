/* Injected failures (FAKECUDA_FAIL) and the error names and texts they, and
 * cuGetErrorName / cuGetErrorString, use. */
#include "fakecuda.h"

/* Only codes that exist in every CUresult enum of CUDA 12.x and 13.x: the
 * Rust side reads the returned value as a Rust enum, where any other value
 * would be undefined behaviour. */
static const struct {
    CUresult code;
    const char *name;
    const char *text;
} ERRORS[] = {
#define E(n, t) {n, #n, t}
    E(CUDA_SUCCESS, "no error"),
    E(CUDA_ERROR_INVALID_VALUE, "invalid argument"),
    E(CUDA_ERROR_OUT_OF_MEMORY, "out of memory"),
    E(CUDA_ERROR_NOT_INITIALIZED, "initialization error"),
    E(CUDA_ERROR_DEINITIALIZED, "driver shutting down"),
    E(CUDA_ERROR_STUB_LIBRARY, "CUDA driver is a stub library"),
    E(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected"),
    E(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal"),
    E(CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid"),
    E(CUDA_ERROR_INVALID_CONTEXT, "invalid device context"),
    E(CUDA_ERROR_CONTEXT_ALREADY_CURRENT, "context already current"),
    E(CUDA_ERROR_MAP_FAILED, "mapping of buffer object failed"),
    E(CUDA_ERROR_UNMAP_FAILED, "unmapping of buffer object failed"),
    E(CUDA_ERROR_ALREADY_MAPPED, "resource already mapped"),
    E(CUDA_ERROR_NOT_MAPPED, "resource not mapped"),
    E(CUDA_ERROR_ECC_UNCORRECTABLE, "uncorrectable ECC error encountered"),
    E(CUDA_ERROR_PEER_ACCESS_UNSUPPORTED, "peer access is not supported between these two devices"),
    E(CUDA_ERROR_INVALID_SOURCE, "device kernel image is invalid"),
    E(CUDA_ERROR_OPERATING_SYSTEM, "OS call failed or operation not supported on this OS"),
    E(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle"),
    E(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state"),
    E(CUDA_ERROR_NOT_FOUND, "named symbol not found"),
    E(CUDA_ERROR_NOT_READY, "device not ready"),
    E(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered"),
    E(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "too many resources requested for launch"),
    E(CUDA_ERROR_LAUNCH_TIMEOUT, "the launch timed out and was terminated"),
    E(CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, "peer access is already enabled"),
    E(CUDA_ERROR_PEER_ACCESS_NOT_ENABLED, "peer access has not been enabled"),
    E(CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE, "cannot set while device is active in this process"),
    E(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed"),
    E(CUDA_ERROR_ASSERT, "device-side assert triggered"),
    E(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "part or all of the requested memory range is already mapped"),
    E(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, "pointer does not correspond to a registered memory region"),
    E(CUDA_ERROR_ILLEGAL_INSTRUCTION, "an illegal instruction was encountered"),
    E(CUDA_ERROR_MISALIGNED_ADDRESS, "misaligned address"),
    E(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure"),
    E(CUDA_ERROR_NOT_PERMITTED, "operation not permitted"),
    E(CUDA_ERROR_NOT_SUPPORTED, "operation not supported"),
    E(CUDA_ERROR_SYSTEM_NOT_READY, "system not yet initialized"),
    E(CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, "system has unsupported display driver / cuda driver combination"),
    E(CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, "forward compatibility was attempted on non supported HW"),
    E(CUDA_ERROR_TIMEOUT, "wait operation timed out"),
    E(CUDA_ERROR_UNKNOWN, "unknown error"),
#undef E
};
#define NERRORS (sizeof ERRORS / sizeof ERRORS[0])

static int error_index(CUresult code) {
    for (size_t i = 0; i < NERRORS; i++)
        if (ERRORS[i].code == code) return (int)i;
    return -1;
}

static const struct {
    const char *name;
    CUresult fault;
} FUNCS[FN_COUNT] = {
#define X(name, err) {#name, err},
    FC_FUNCS(X)
#undef X
};

/* Parsed FAKECUDA_FAIL entries. */
#define MAX_RULES 64
static struct {
    int fn;
    unsigned long nth; /* 0: every call */
    CUresult err;
} g_rules[MAX_RULES];
static int g_nrules;
static atomic_ulong g_calls[FN_COUNT];

CUresult fault_check(int fn) {
    unsigned long k = atomic_fetch_add(&g_calls[fn], 1) + 1;
    for (int i = 0; i < g_nrules; i++)
        if (g_rules[i].fn == fn && (g_rules[i].nth == 0 || g_rules[i].nth == k))
            return g_rules[i].err;
    return CUDA_SUCCESS;
}

void faults_reset_counts(void) {
    for (int i = 0; i < FN_COUNT; i++) atomic_store(&g_calls[i], 0);
}

/* One entry, `symbol[@n][=CUDA_ERROR_NAME]`, blanks trimmed; `entry` is its
 * text for the warnings. Returns 0 when it was added. */
static int parse_entry(char *tok, const char *entry) {
    char *eq = strchr(tok, '='), *at;
    if (eq) *eq++ = 0;
    at = strchr(tok, '@');
    if (at) *at++ = 0;
    size_t sl = strlen(tok);
    if (sl > 3 && strcmp(tok + sl - 3, "_v2") == 0) tok[sl - 3] = 0;
    int fn = -1;
    for (int i = 0; i < FN_COUNT; i++)
        if (strcmp(FUNCS[i].name, tok) == 0) fn = i;
    if (fn < 0) {
        warn("FAKECUDA_FAIL: ignoring '%s': unknown driver function '%s'", entry, tok);
        return -1;
    }
    unsigned long nth = 0;
    if (at) {
        char *end;
        errno = 0;
        nth = strtoul(at, &end, 10);
        if (errno || *end || nth == 0 || *at == '-' || *at == 0) {
            warn("FAKECUDA_FAIL: ignoring '%s': '@%s' is not a call number (1, 2, ...)", entry, at);
            return -1;
        }
    }
    CUresult err = FUNCS[fn].fault;
    if (eq) {
        int k = -1;
        for (size_t i = 0; i < NERRORS; i++)
            if (strcmp(ERRORS[i].name, eq) == 0) k = (int)i;
        if (k <= 0) { /* unknown, or CUDA_SUCCESS */
            warn("FAKECUDA_FAIL: ignoring '%s': '%s' is not a CUDA error name this library knows", entry, eq);
            return -1;
        }
        err = ERRORS[k].code;
    }
    if (g_nrules == MAX_RULES) {
        warn("FAKECUDA_FAIL: ignoring '%s': more than %d entries", entry, MAX_RULES);
        return -1;
    }
    g_rules[g_nrules].fn = fn;
    g_rules[g_nrules].nth = nth;
    g_rules[g_nrules].err = err;
    g_nrules++;
    return 0;
}

void faults_parse(const char *spec) {
    char *copy = strdup(spec);
    if (!copy) return;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ' || *tok == '\t') tok++;
        size_t tl = strlen(tok);
        while (tl && (tok[tl - 1] == ' ' || tok[tl - 1] == '\t')) tok[--tl] = 0;
        if (!*tok) continue;
        char entry[128];
        snprintf(entry, sizeof entry, "%s", tok);
        parse_entry(tok, entry);
    }
    free(copy);
}

/* ------------------------------------------------------------------------ */
/* Error names and texts                                                     */
/* ------------------------------------------------------------------------ */

EXPORT CUresult cuGetErrorName(CUresult e, const char **s) {
    ENTER(cuGetErrorName);
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    int i = error_index(e);
    *s = i < 0 ? NULL : ERRORS[i].name;
    return i < 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char **s) {
    ENTER(cuGetErrorString);
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    int i = error_index(e);
    *s = i < 0 ? NULL : ERRORS[i].text;
    return i < 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}
