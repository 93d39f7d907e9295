// Command dbinit writes a stopped step-ca's database for the tests, with
// step-ca's own code: the provisioners of its ca.json, and external
// account binding keys for those that require EAB.
//
// Why not ca.json alone: step-ca v0.30.2 looks EAB keys up under the
// ACME provisioner's database ID (acme/api/eab.go), which only
// provisioners kept in its database have (ca.json's get none, and a key
// stored under an empty ID is refused: "key required"). It creates EAB
// keys only through its admin API, whose EAB endpoints in the
// open-source build answer "only available in Certificate Manager"
// (authority/admin/api/acme.go); the step CLI uses that API too. So,
// before step-ca starts (bbolt locks the file while it runs), this
// copies ca.json's provisioners into the database as step-ca's own
// first-start migration does (authority.ProvisionerToLinkedca), and
// makes the keys with acme/db/nosql's CreateExternalAccountKey: the
// records are exactly those step-ca reads. ca.json sets enableAdmin, so
// step-ca loads the provisioners from the database.
//
// Usage: dbinit -config ca.json -eab N
// For each key it prints one JSON line {"provisioner","reference","kid",
// "hmac"} on stdout, the HMAC key base64url-encoded as ACME clients take
// it.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"

	acmedb "github.com/smallstep/certificates/acme/db/nosql"
	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/admin"
	admindb "github.com/smallstep/certificates/authority/admin/db/nosql"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/nosql"
)

func main() {
	cfgPath := flag.String("config", "", "step-ca's ca.json")
	eab := flag.Int("eab", 0, "EAB keys to make for each provisioner that requires EAB")
	flag.Parse()
	if err := run(*cfgPath, *eab); err != nil {
		fmt.Fprintln(os.Stderr, "dbinit:", err)
		os.Exit(1)
	}
}

func run(cfgPath string, eab int) error {
	if cfgPath == "" {
		return errors.New("usage: dbinit -config ca.json [-eab N]")
	}
	cfg, err := config.LoadConfiguration(cfgPath)
	if err != nil {
		return err
	}
	if cfg.DB == nil || cfg.DB.Type != nosql.BBoltDriver || !cfg.AuthorityConfig.EnableAdmin {
		return errors.New("ca.json must use a bbolt database and set authority.enableAdmin")
	}
	db, err := nosql.New(nosql.BBoltDriver, cfg.DB.DataSource)
	if err != nil {
		return err
	}
	defer db.Close()
	adb, err := admindb.New(db, admin.DefaultAuthorityID)
	if err != nil {
		return err
	}
	kdb, err := acmedb.New(db)
	if err != nil {
		return err
	}
	ctx := context.Background()
	out := json.NewEncoder(os.Stdout)
	for _, p := range cfg.AuthorityConfig.Provisioners {
		lp, err := authority.ProvisionerToLinkedca(p)
		if err != nil {
			return fmt.Errorf("provisioner %q: %v", p.GetName(), err)
		}
		if err := adb.CreateProvisioner(ctx, lp); err != nil {
			return fmt.Errorf("provisioner %q: %v", p.GetName(), err)
		}
		acme, ok := p.(*provisioner.ACME)
		if !ok || !acme.RequireEAB {
			continue
		}
		for i := range eab {
			ref := fmt.Sprintf("lbcert-test-%d", i+1)
			k, err := kdb.CreateExternalAccountKey(ctx, lp.Id, ref)
			if err != nil {
				return fmt.Errorf("EAB key %q for %q: %v", ref, p.GetName(), err)
			}
			line := map[string]string{"provisioner": p.GetName(), "reference": ref, "kid": k.ID, "hmac": base64.RawURLEncoding.EncodeToString(k.HmacKey)}
			if err := out.Encode(line); err != nil {
				return err
			}
		}
	}
	return nil
}
