package fleet

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"

	"filippo.io/age"
)

// The fleet's keys, and why each exists:
//
//   - The data key: 32 random bytes, one per epoch. It seals every private
//     key (certificates' and the ACME account's) with AES-256-GCM before
//     it leaves a node, and nothing else can open them. There is no
//     default key and no plaintext mode: a fleet without a data key
//     cannot be created.
//   - A node's identity: an age X25519 key pair made by `fleet join` (or
//     `fleet init`) in the node's own --dir, 0600. The public half, the
//     "fingerprint" age1..., is what an operator approves. The data key
//     reaches a node only wrapped for its identity (age), so a Redis
//     reader who is not an approved node learns nothing.
//   - MACs under the data key bind the records a member must be able to
//     trust in a Redis anyone with access could write: the membership
//     list (so a planted member is never wrapped the next key) and each
//     new epoch (so a key rotation is accepted only if it came from a
//     holder of the previous key).

const keySize = 32

// sealVersion starts every sealed blob, so the format can change.
const sealVersion = 1

// newDataKey makes a fresh data key.
func newDataKey() ([]byte, error) {
	k := make([]byte, keySize)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	return k, nil
}

// bundleAD binds a sealed private key to the fleet, the lineage name and
// the version: a bundle copied under another name, to another version or
// into another fleet does not open.
func bundleAD(fleetID, name string, version int) []byte {
	return []byte("lbcert-bundle-v1\x00" + fleetID + "\x00" + name + "\x00" + strconv.Itoa(version))
}

// accountAD binds a sealed account key to its fleet, CA and email.
func accountAD(fleetID, server, email string) []byte {
	return []byte("lbcert-account-v1\x00" + fleetID + "\x00" + server + "\x00" + email)
}

// gcmOf is AES-256-GCM under a data key; a missing key is an error,
// never a default.
func gcmOf(key []byte) (cipher.AEAD, error) {
	if len(key) != keySize {
		return nil, errors.New("fleet data key is not set")
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// seal encrypts plaintext under key with AES-256-GCM: version byte,
// 12-byte random nonce, ciphertext and tag.
func seal(key, ad, plaintext []byte) ([]byte, error) {
	gcm, err := gcmOf(key)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+gcm.NonceSize(), 1+gcm.NonceSize()+len(plaintext)+gcm.Overhead())
	out[0] = sealVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, err
	}
	return gcm.Seal(out, out[1:1+gcm.NonceSize()], plaintext, ad), nil
}

// ErrOpen is a sealed blob that does not open: another key, another
// name, version or fleet, or tampered with.
var ErrOpen = errors.New("the sealed key does not open with this fleet's data key (moved, tampered with, or sealed under another key)")

func open(key, ad, sealed []byte) ([]byte, error) {
	gcm, err := gcmOf(key)
	if err != nil {
		return nil, err
	}
	if len(sealed) < 1+gcm.NonceSize()+gcm.Overhead() || sealed[0] != sealVersion {
		return nil, ErrOpen
	}
	pt, err := gcm.Open(nil, sealed[1:1+gcm.NonceSize()], sealed[1+gcm.NonceSize():], ad)
	if err != nil {
		return nil, ErrOpen
	}
	return pt, nil
}

// wrap encrypts the data key for one node's identity.
func wrap(dataKey []byte, recipient string) ([]byte, error) {
	r, err := age.ParseX25519Recipient(recipient)
	if err != nil {
		return nil, fmt.Errorf("fingerprint %q: %v", recipient, err)
	}
	var buf bytes.Buffer
	w, err := age.Encrypt(&buf, r)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(dataKey); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// unwrap opens a data key wrapped for id.
func unwrap(wrapped []byte, id *age.X25519Identity) ([]byte, error) {
	r, err := age.Decrypt(bytes.NewReader(wrapped), id)
	if err != nil {
		return nil, err
	}
	k, err := io.ReadAll(io.LimitReader(r, keySize+1))
	if err != nil {
		return nil, err
	}
	if len(k) != keySize {
		return nil, errors.New("wrapped data key has the wrong size")
	}
	return k, nil
}

// mac authenticates a fleet record under the data key.
func mac(key []byte, parts ...string) string {
	h := hmac.New(sha256.New, key)
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

func macOK(key []byte, got string, parts ...string) bool {
	return hmac.Equal([]byte(got), []byte(mac(key, parts...)))
}

// keyID names a data key without revealing it.
func keyID(key []byte) string {
	h := sha256.Sum256(append([]byte("lbcert-key-id\x00"), key...))
	return hex.EncodeToString(h[:8])
}
