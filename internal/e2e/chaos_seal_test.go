package e2e

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"filippo.io/age"
)

// The fleet's sealing format, re-implemented here from
// internal/fleet/crypto.go so the key-custody check (I5) needs nothing
// of lbcert's but its files and Redis:
//
//   - a data key is 32 bytes, wrapped with age (X25519) for a node's
//     identity: <dir>/fleet/identity.txt, <dir>/fleet/datakey-N.age,
//     and in Redis lbcert:wrapped:N, field node;
//   - a sealed private key is 1 version byte (1), a 12-byte nonce and
//     AES-256-GCM's ciphertext and tag, under additional data that
//     binds it to the fleet, the lineage and the version (a bundle) or
//     to the fleet, the CA and the email (an account).

func bundleAD(fleetID, name string, version int) []byte {
	return []byte("lbcert-bundle-v1\x00" + fleetID + "\x00" + name + "\x00" + strconv.Itoa(version))
}

func accountAD(fleetID, server, email string) []byte {
	return []byte("lbcert-account-v1\x00" + fleetID + "\x00" + server + "\x00" + email)
}

// opens says whether sealed opens under key with ad.
func opens(key, ad, sealed []byte) bool {
	if len(key) != 32 {
		return false
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return false
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return false
	}
	ns := gcm.NonceSize()
	if len(sealed) < 1+ns+gcm.Overhead() || sealed[0] != 1 {
		return false
	}
	_, err = gcm.Open(nil, sealed[1:1+ns], sealed[1+ns:], ad)
	return err == nil
}

// nodeIdentity reads a node's age identity and fleet ID from its --dir.
func nodeIdentity(dir string) (age.Identity, string, error) {
	data, err := os.ReadFile(filepath.Join(dir, "fleet", "identity.txt"))
	if err != nil {
		return nil, "", err
	}
	ids, err := age.ParseIdentities(bytes.NewReader(data))
	if err != nil {
		return nil, "", err
	}
	var st struct {
		Fleet string `json:"fleet_id"`
	}
	if b, err := os.ReadFile(filepath.Join(dir, "fleet", "state.json")); err == nil {
		json.Unmarshal(b, &st)
	}
	return ids[0], st.Fleet, nil
}

// unwrapKey opens a data key wrapped for id; nil if it does not open.
func unwrapKey(wrapped []byte, id age.Identity) []byte {
	r, err := age.Decrypt(bytes.NewReader(wrapped), id)
	if err != nil {
		return nil
	}
	k, err := io.ReadAll(io.LimitReader(r, 33))
	if err != nil || len(k) != 32 {
		return nil
	}
	return k
}

// diskDataKeys are the data keys a node's own files open: every
// datakey-N.age in its fleet directory, by epoch.
func diskDataKeys(dir string, id age.Identity) map[int][]byte {
	out := map[int][]byte{}
	paths, _ := filepath.Glob(filepath.Join(dir, "fleet", "datakey-*.age"))
	for _, p := range paths {
		var n int
		base := filepath.Base(p)
		n, err := strconv.Atoi(base[len("datakey-") : len(base)-len(".age")])
		if err != nil {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if k := unwrapKey(data, id); k != nil {
			out[n] = k
		}
	}
	return out
}
