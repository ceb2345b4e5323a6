# ---- crypto.pxi: sealing and opening data datagrams of encrypted networks (AEAD, in place) ----
#
# Read this beside overlay/core/seal.py, the reference: the header, the nonce, the additional
# data and the replay window are the same, rule for rule; tests hold them equal.
#
#   [ header 16: type 4 | 0 0 0 | receiver index (LE) | counter (LE) ][ VXLAN datagram ][ tag 16 ]
#
# Sealing writes the header into the 16 bytes of headroom in front of the VXLAN header and the
# tag into the tailroom behind the frame; opening leaves the VXLAN datagram where decap looks
# for it (split_datagrams places an encrypted datagram 16 bytes early). One OpenSSL cipher
# context per session and direction, keyed once: per datagram only the nonce is set. AES-256-GCM
# uses AES-NI/VAES where the CPU has them (OpenSSL picks); ChaCha20-Poly1305 is the other cipher.

cdef extern from "<openssl/evp.h>":
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new() nogil
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX* ctx) nogil
    const EVP_CIPHER* EVP_aes_256_gcm() nogil
    const EVP_CIPHER* EVP_chacha20_poly1305() nogil
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* c, void* engine,
                           const unsigned char* key, const unsigned char* iv) nogil
    int EVP_DecryptInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* c, void* engine,
                           const unsigned char* key, const unsigned char* iv) nogil
    int EVP_EncryptUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                          const unsigned char* inp, int inl) nogil
    int EVP_DecryptUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                          const unsigned char* inp, int inl) nogil
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl) nogil
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl) nogil
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX* ctx, int type, int arg, void* ptr) nogil
    int EVP_CTRL_AEAD_GET_TAG, EVP_CTRL_AEAD_SET_TAG

cdef enum:
    SEAL_DATA = 4           # seal.DATA
    SEAL_HLEN = 16          # seal.HEADER_LEN
    SEAL_TAG = 16           # seal.TAG_LEN
    SEAL_OVERHEAD = 32
    CIPHER_AES_256_GCM = 1
    CIPHER_CHACHA20_POLY1305 = 2
    WINDOW_WORDS = 64       # seal.WINDOW_WORDS
    HS_INITIATION = 1       # handshake messages (overlay/core/handshake.py): handed to Python
    HS_RESPONSE = 2
    HS_MAX = 256            # the largest handshake message kept
    HS_INITIATION_LEN = 133 # handshake.INITIATION_LEN: messages of any other size are dropped here
    HS_RESPONSE_LEN = 77    # handshake.RESPONSE_LEN
    HS_RING = 64            # handshake messages queued between two take_handshakes calls

cdef uint64_t REJECT_AFTER_MESSAGES = 0xFFFFFFFFFFFFDFFFu   # seal.REJECT_AFTER_MESSAGES: 2^64 - 2^13 - 1
cdef uint64_t WINDOW = (WINDOW_WORDS - 1) * 64



cdef inline void put_le32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF; p[1] = (v >> 8) & 0xFF; p[2] = (v >> 16) & 0xFF; p[3] = v >> 24


cdef inline uint32_t le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]


cdef inline uint64_t le64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>le32(p + 4) << 32) | le32(p)


cdef inline void make_nonce(uint8_t* nonce, const uint8_t* counter_le) noexcept nogil:
    """seal.nonce: 4 zero bytes, then the header's 8 counter bytes (little endian)."""
    memset(nonce, 0, 4)
    memcpy(nonce + 4, counter_le, 8)


# OpenSSL 3's EVP layer costs about 0.5 us per AEAD call on this kind of machine (parameter
# lookups by name on every init, tag and IV-length query: perf shows strcmp at the top), more
# than AES-GCM itself takes on a small datagram. So the cipher implementations of OpenSSL's
# default provider are called directly, through the dispatch table it publishes (the same
# functions EVP ends up in; keyed once, only the nonce set per datagram). Where that table
# cannot be had (another provider configured), EVP is used: same results, slower.

cdef extern from "<openssl/core.h>":
    ctypedef struct OSSL_DISPATCH:
        int function_id
        void (*function)()
    ctypedef struct OSSL_ALGORITHM:
        const char* algorithm_names
        const char* property_definition
        const OSSL_DISPATCH* implementation
        const char* algorithm_description
    ctypedef struct OSSL_PARAM:
        const char* key
        unsigned int data_type
        void* data
        size_t data_size
        size_t return_size

cdef extern from "<openssl/provider.h>":
    ctypedef struct OSSL_PROVIDER:
        pass
    OSSL_PROVIDER* OSSL_PROVIDER_load(void* libctx, const char* name)
    const char* OSSL_PROVIDER_get0_name(const OSSL_PROVIDER* prov)
    const OSSL_ALGORITHM* OSSL_PROVIDER_query_operation(const OSSL_PROVIDER* prov, int operation_id, int* no_cache)
    void* OSSL_PROVIDER_get0_provider_ctx(const OSSL_PROVIDER* prov)

cdef extern from "<openssl/evp.h>":
    EVP_CIPHER* EVP_CIPHER_fetch(void* libctx, const char* algorithm, const char* properties)
    void EVP_CIPHER_free(EVP_CIPHER* c)
    const OSSL_PROVIDER* EVP_CIPHER_get0_provider(const EVP_CIPHER* c)

cdef extern from "<strings.h>":
    int strncasecmp(const char* a, const char* b, size_t n) nogil

cdef extern from "<string.h>":
    size_t strlen(const char* s) nogil

ctypedef void* (*newctx_f)(void* provctx) noexcept nogil
ctypedef void (*freectx_f)(void* ctx) noexcept nogil
ctypedef int (*init_f)(void* ctx, const unsigned char* key, size_t keylen, const unsigned char* iv,
                       size_t ivlen, const OSSL_PARAM* params) noexcept nogil
ctypedef int (*update_f)(void* ctx, unsigned char* out, size_t* outl, size_t outsize,
                         const unsigned char* inp, size_t inl) noexcept nogil
ctypedef int (*final_f)(void* ctx, unsigned char* out, size_t* outl, size_t outsize) noexcept nogil
ctypedef int (*getp_f)(void* ctx, OSSL_PARAM* params) noexcept nogil
ctypedef int (*setp_f)(void* ctx, const OSSL_PARAM* params) noexcept nogil

cdef enum:
    OP_CIPHER = 2               # OSSL_OP_CIPHER and the OSSL_FUNC_CIPHER_* ids (core_dispatch.h)
    FN_NEWCTX = 1
    FN_ENCRYPT_INIT = 2
    FN_DECRYPT_INIT = 3
    FN_UPDATE = 4
    FN_FINAL = 5
    FN_FREECTX = 7
    FN_GET_CTX_PARAMS = 10
    FN_SET_CTX_PARAMS = 11
    PARAM_OCTET_STRING = 5      # OSSL_PARAM_OCTET_STRING

cdef struct Impl:               # one cipher of the default provider, called directly
    void* provctx
    newctx_f newctx
    freectx_f freectx
    init_f einit
    init_f dinit
    update_f update
    final_f final
    getp_f get_params
    setp_f set_params

cdef struct Aead:               # a keyed cipher context for one session and direction
    void* ctx                   # the provider's (impl != NULL) ...
    Impl* impl
    EVP_CIPHER_CTX* evp         # ... or EVP's

cdef Impl IMPLS[3]              # by cipher id: [1] AES-256-GCM, [2] ChaCha20-Poly1305
cdef bint IMPLS_LOOKED_UP = False
cdef const char* TAG_PARAM = "tag"     # OSSL_CIPHER_PARAM_AEAD_TAG


cdef bint has_name(const char* names, const char* name) noexcept nogil:
    """Whether the provider's colon-separated ``names`` include ``name`` (any case)."""
    cdef size_t n = strlen(name)
    cdef const char* p = names
    while p != NULL and p[0] != 0:
        if strncasecmp(p, name, n) == 0 and (p[n] == 0 or p[n] == 58):    # ':'
            return True
        while p[0] != 0 and p[0] != 58:
            p += 1
        if p[0] == 58:
            p += 1
    return False


cdef void look_up_impls() noexcept:
    """Fill IMPLS from the default provider's cipher table (once); an entry left without all
    its functions means EVP is used for that cipher."""
    global IMPLS_LOOKED_UP
    cdef OSSL_PROVIDER* prov
    cdef const OSSL_ALGORITHM* algs
    cdef const OSSL_DISPATCH* d
    cdef int no_cache = 0, cipher
    cdef Impl* impl
    cdef EVP_CIPHER* fetched
    cdef const char* name
    cdef bint is_default
    IMPLS_LOOKED_UP = True
    memset(IMPLS, 0, sizeof(IMPLS))
    # Only where the library context's AES-256-GCM is the default provider's (not under a FIPS
    # or other provider configuration): then its functions are the ones EVP would call.
    fetched = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL)
    if fetched == NULL:
        return
    name = OSSL_PROVIDER_get0_name(EVP_CIPHER_get0_provider(fetched))
    is_default = name != NULL and strncasecmp(name, "default", 8) == 0
    EVP_CIPHER_free(fetched)
    if not is_default:
        return
    prov = OSSL_PROVIDER_load(NULL, "default")
    if prov == NULL:
        return
    algs = OSSL_PROVIDER_query_operation(prov, OP_CIPHER, &no_cache)
    while algs != NULL and algs.algorithm_names != NULL:
        if has_name(algs.algorithm_names, "AES-256-GCM"):
            cipher = CIPHER_AES_256_GCM
        elif has_name(algs.algorithm_names, "ChaCha20-Poly1305"):
            cipher = CIPHER_CHACHA20_POLY1305
        else:
            algs += 1
            continue
        impl = &IMPLS[cipher]
        impl.provctx = OSSL_PROVIDER_get0_provider_ctx(prov)
        d = algs.implementation
        while d.function_id != 0:
            if d.function_id == FN_NEWCTX:
                impl.newctx = <newctx_f>d.function
            elif d.function_id == FN_FREECTX:
                impl.freectx = <freectx_f>d.function
            elif d.function_id == FN_ENCRYPT_INIT:
                impl.einit = <init_f>d.function
            elif d.function_id == FN_DECRYPT_INIT:
                impl.dinit = <init_f>d.function
            elif d.function_id == FN_UPDATE:
                impl.update = <update_f>d.function
            elif d.function_id == FN_FINAL:
                impl.final = <final_f>d.function
            elif d.function_id == FN_GET_CTX_PARAMS:
                impl.get_params = <getp_f>d.function
            elif d.function_id == FN_SET_CTX_PARAMS:
                impl.set_params = <setp_f>d.function
            d += 1
        algs += 1


cdef inline bint impl_complete(const Impl* i) noexcept nogil:
    return (i.newctx != NULL and i.freectx != NULL and i.einit != NULL and i.dinit != NULL
            and i.update != NULL and i.final != NULL and i.get_params != NULL and i.set_params != NULL)


cdef bint USE_PROVIDER = True   # tests turn it off to hold both paths equal


cdef bint aead_new(Aead* a, int cipher, const uint8_t* key, bint encrypt) noexcept:
    """Key ``a`` once for one session's direction; False if OpenSSL refuses."""
    cdef Impl* impl
    cdef const EVP_CIPHER* c
    cdef int ok
    a.ctx = NULL
    a.impl = NULL
    a.evp = NULL
    if not IMPLS_LOOKED_UP:
        look_up_impls()
    impl = &IMPLS[cipher]
    if USE_PROVIDER and impl_complete(impl):
        a.ctx = impl.newctx(impl.provctx)
        if a.ctx == NULL:
            return False
        ok = (impl.einit if encrypt else impl.dinit)(a.ctx, key, 32, NULL, 0, NULL)
        if ok != 1:
            impl.freectx(a.ctx)
            a.ctx = NULL
            return False
        a.impl = impl
        return True
    c = EVP_aes_256_gcm() if cipher == CIPHER_AES_256_GCM else EVP_chacha20_poly1305()
    a.evp = EVP_CIPHER_CTX_new()
    if a.evp == NULL:
        return False
    ok = EVP_EncryptInit_ex(a.evp, c, NULL, key, NULL) if encrypt else EVP_DecryptInit_ex(a.evp, c, NULL, key, NULL)
    if ok != 1:
        EVP_CIPHER_CTX_free(a.evp)
        a.evp = NULL
        return False
    return True


cdef inline bint aead_ready(const Aead* a) noexcept nogil:
    return a.ctx != NULL or a.evp != NULL


cdef void aead_free(Aead* a) noexcept nogil:
    if a.ctx != NULL:
        a.impl.freectx(a.ctx)
    if a.evp != NULL:
        EVP_CIPHER_CTX_free(a.evp)
    a.ctx = NULL
    a.impl = NULL
    a.evp = NULL


cdef inline void tag_param(OSSL_PARAM* params, uint8_t* tag) noexcept nogil:
    params[0].key = TAG_PARAM
    params[0].data_type = PARAM_OCTET_STRING
    params[0].data = tag
    params[0].data_size = SEAL_TAG
    params[0].return_size = <size_t>-1     # OSSL_PARAM_UNMODIFIED
    params[1].key = NULL
    params[1].data_type = 0
    params[1].data = NULL
    params[1].data_size = 0
    params[1].return_size = 0


cdef bint seal_in_place(Aead* a, uint32_t index, uint64_t counter, uint8_t* p,
                        Py_ssize_t n) noexcept nogil:
    """seal.seal: the n-byte VXLAN datagram at p + 16 becomes the data datagram at p
    (16 + n + 16 bytes): header written at p, ciphertext over the datagram, tag behind it."""
    cdef uint8_t nonce[12]
    cdef int outl = 0, fin = 0
    cdef size_t out = 0, done = 0
    cdef OSSL_PARAM params[2]
    cdef Impl* impl = a.impl
    cdef int k
    p[0] = SEAL_DATA
    p[1] = 0; p[2] = 0; p[3] = 0
    put_le32(p + 4, index)
    for k in range(8):
        p[8 + k] = (counter >> (8 * k)) & 0xFF
    make_nonce(nonce, p + 8)
    if impl != NULL:
        if impl.einit(a.ctx, NULL, 0, nonce, 12, NULL) != 1:
            return False
        if impl.update(a.ctx, NULL, &out, SEAL_HLEN, p, SEAL_HLEN) != 1:
            return False
        if n and impl.update(a.ctx, p + SEAL_HLEN, &out, n, p + SEAL_HLEN, n) != 1:
            return False
        if impl.final(a.ctx, p + SEAL_HLEN + out, &done, 0) != 1:
            return False
        tag_param(params, p + SEAL_HLEN + n)
        return impl.get_params(a.ctx, params) == 1
    if EVP_EncryptInit_ex(a.evp, NULL, NULL, NULL, nonce) != 1:
        return False
    if EVP_EncryptUpdate(a.evp, NULL, &outl, p, SEAL_HLEN) != 1:
        return False
    if EVP_EncryptUpdate(a.evp, p + SEAL_HLEN, &outl, p + SEAL_HLEN, <int>n) != 1:
        return False
    if EVP_EncryptFinal_ex(a.evp, p + SEAL_HLEN + outl, &fin) != 1:
        return False
    return EVP_CIPHER_CTX_ctrl(a.evp, EVP_CTRL_AEAD_GET_TAG, SEAL_TAG, p + SEAL_HLEN + n) == 1


cdef bint open_in_place(Aead* a, uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The AEAD check of seal.open_datagram: the n-byte data datagram at p authenticates, and
    its VXLAN datagram (n - 32 bytes) is then at p + 16. The bytes are decrypted in place
    whether or not it authenticates (a failing datagram is dropped, so nothing reads them)."""
    cdef uint8_t nonce[12]
    cdef int outl = 0, fin = 0
    cdef size_t out = 0, done = 0
    cdef Py_ssize_t m = n - SEAL_OVERHEAD
    cdef OSSL_PARAM params[2]
    cdef Impl* impl = a.impl
    make_nonce(nonce, p + 8)
    if impl != NULL:
        if impl.dinit(a.ctx, NULL, 0, nonce, 12, NULL) != 1:
            return False
        if impl.update(a.ctx, NULL, &out, SEAL_HLEN, p, SEAL_HLEN) != 1:
            return False
        if m and impl.update(a.ctx, p + SEAL_HLEN, &out, m, p + SEAL_HLEN, m) != 1:
            return False
        tag_param(params, p + n - SEAL_TAG)
        if impl.set_params(a.ctx, params) != 1:
            return False
        return impl.final(a.ctx, p + SEAL_HLEN + out, &done, 0) == 1
    if EVP_DecryptInit_ex(a.evp, NULL, NULL, NULL, nonce) != 1:
        return False
    if EVP_DecryptUpdate(a.evp, NULL, &outl, p, SEAL_HLEN) != 1:
        return False
    if EVP_DecryptUpdate(a.evp, p + SEAL_HLEN, &outl, p + SEAL_HLEN, <int>m) != 1:
        return False
    if EVP_CIPHER_CTX_ctrl(a.evp, EVP_CTRL_AEAD_SET_TAG, SEAL_TAG, p + n - SEAL_TAG) != 1:
        return False
    return EVP_DecryptFinal_ex(a.evp, p + SEAL_HLEN + outl, &fin) == 1


cdef struct RxSession:
    Aead aead
    uint32_t index          # ours: the receiver index in the header
    uint32_t vtep           # the peer it is with
    uint64_t last           # the replay window (seal.ReplayWindow)
    uint64_t ring[WINDOW_WORDS]
    uint64_t packets, nbytes
    bint used
    bint confirmed          # an authenticated datagram arrived (reported once: take_confirmed)


cdef bint replay_accept(RxSession* s, uint64_t counter) noexcept nogil:
    """seal.ReplayWindow.accept."""
    cdef uint64_t block = counter >> 6, current, k, diff, bit, word
    if counter >= REJECT_AFTER_MESSAGES:
        return False
    if counter > s.last:
        current = s.last >> 6
        diff = block - current
        if diff > WINDOW_WORDS:
            diff = WINDOW_WORDS
        for k in range(1, diff + 1):
            s.ring[(current + k) % WINDOW_WORDS] = 0
        s.last = counter
    elif s.last - counter > WINDOW:
        return False
    word = block % WINDOW_WORDS
    bit = (<uint64_t>1) << (counter & 63)
    if s.ring[word] & bit:
        return False
    s.ring[word] |= bit
    return True
