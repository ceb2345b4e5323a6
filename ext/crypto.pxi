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
    HS_RING = 64            # handshake messages queued between two take_handshakes calls

cdef uint64_t REJECT_AFTER_MESSAGES = 0xFFFFFFFFFFFFDFFFu   # seal.REJECT_AFTER_MESSAGES: 2^64 - 2^13 - 1
cdef uint64_t WINDOW = (WINDOW_WORDS - 1) * 64


cdef struct RxSession:
    EVP_CIPHER_CTX* ctx
    uint32_t index          # ours: the receiver index in the header
    uint32_t vtep           # the peer it is with
    uint64_t last           # the replay window (seal.ReplayWindow)
    uint64_t ring[WINDOW_WORDS]
    uint64_t packets, nbytes
    bint used
    bint confirmed          # an authenticated datagram arrived (reported once: take_confirmed)


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


cdef EVP_CIPHER_CTX* cipher_context(int cipher, const uint8_t* key, bint encrypt):
    """A context keyed once for a session's direction; NULL if OpenSSL refuses."""
    cdef const EVP_CIPHER* c = EVP_aes_256_gcm() if cipher == CIPHER_AES_256_GCM else EVP_chacha20_poly1305()
    cdef EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new()
    cdef int ok
    if ctx == NULL:
        return NULL
    if encrypt:
        ok = EVP_EncryptInit_ex(ctx, c, NULL, key, NULL)
    else:
        ok = EVP_DecryptInit_ex(ctx, c, NULL, key, NULL)
    if ok != 1:
        EVP_CIPHER_CTX_free(ctx)
        return NULL
    return ctx


cdef bint seal_in_place(EVP_CIPHER_CTX* ctx, uint32_t index, uint64_t counter, uint8_t* p,
                        Py_ssize_t n) noexcept nogil:
    """seal.seal: the n-byte VXLAN datagram at p + 16 becomes the data datagram at p
    (16 + n + 16 bytes): header written at p, ciphertext over the datagram, tag behind it."""
    cdef uint8_t nonce[12]
    cdef int outl = 0, fin = 0
    cdef int k
    p[0] = SEAL_DATA
    p[1] = 0; p[2] = 0; p[3] = 0
    put_le32(p + 4, index)
    for k in range(8):
        p[8 + k] = (counter >> (8 * k)) & 0xFF
    make_nonce(nonce, p + 8)
    if EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1:
        return False
    if EVP_EncryptUpdate(ctx, NULL, &outl, p, SEAL_HLEN) != 1:
        return False
    if EVP_EncryptUpdate(ctx, p + SEAL_HLEN, &outl, p + SEAL_HLEN, <int>n) != 1:
        return False
    if EVP_EncryptFinal_ex(ctx, p + SEAL_HLEN + outl, &fin) != 1:
        return False
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, SEAL_TAG, p + SEAL_HLEN + n) == 1


cdef bint open_in_place(EVP_CIPHER_CTX* ctx, uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The AEAD check of seal.open_datagram: the n-byte data datagram at p authenticates, and
    its VXLAN datagram (n - 32 bytes) is then at p + 16. The bytes are decrypted in place
    whether or not it authenticates (a failing datagram is dropped, so nothing reads them)."""
    cdef uint8_t nonce[12]
    cdef int outl = 0, fin = 0
    make_nonce(nonce, p + 8)
    if EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1:
        return False
    if EVP_DecryptUpdate(ctx, NULL, &outl, p, SEAL_HLEN) != 1:
        return False
    if EVP_DecryptUpdate(ctx, p + SEAL_HLEN, &outl, p + SEAL_HLEN, <int>(n - SEAL_OVERHEAD)) != 1:
        return False
    if EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, SEAL_TAG, p + n - SEAL_TAG) != 1:
        return False
    return EVP_DecryptFinal_ex(ctx, p + SEAL_HLEN + outl, &fin) == 1


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
