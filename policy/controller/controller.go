// Package controller is the single cluster-wide writer of sidelane's Istio
// EnvoyFilters and of L7Policy status, run by `sidelane controller` (a
// Deployment, never the node agent). Its replicas compete for a
// coordination.k8s.io Lease (RunLeader), so exactly one writes at a time;
// every replica keeps warm informer caches (Start), and a new leader simply
// reconciles the whole state again (Run). Each pass is level-based: compile
// every policy against every pod, create or update the EnvoyFilters that
// should exist, delete sidelane's EnvoyFilters that should not (garbage
// collection that does not depend on kube-controller-manager), and write
// each policy's status.
package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/input"
)

// EnvoyFilterGVR is the Istio resource the controller writes (L7Policies
// are input.L7PolicyGVR).
var EnvoyFilterGVR = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1alpha3", Resource: "envoyfilters"}

// Condition types beyond v1alpha1.ConditionAccepted.
const (
	// ConditionEnforced is about the sidecars only, and only the controller
	// writes it: True when every pod group the policy selects got its
	// EnvoyFilter; False (reason SelectorConflict) when a group cannot be
	// isolated by a label-only workload selector. Node agents cannot write
	// status, so with no controller running the condition is absent, or its
	// observedGeneration is behind metadata.generation: nothing applies that
	// generation to sidecars (see SidecarEnforcement).
	ConditionEnforced      = "Enforced"
	ReasonProgrammed       = "Programmed"
	ReasonSelectorConflict = "SelectorConflict"
	fieldManager           = "sidelane"
)

// Log attribute keys.
const (
	attrName      = "name"
	attrNamespace = "namespace"
	attrError     = "error"
)

// Controller reconciles EnvoyFilters and policy status.
type Controller struct {
	log         *slog.Logger
	kube        kubernetes.Interface
	dyn         dynamic.Interface
	trustDomain string
	metrics     *metrics

	pods     corelisters.PodLister
	nss      corelisters.NamespaceLister
	policies cache.GenericLister
	filters  cache.GenericLister
	synced   []cache.InformerSynced
	start    func(<-chan struct{})
	started  atomic.Bool
	trigger  chan struct{}
}

// New wires informers; call Run to start them and reconcile.
func New(log *slog.Logger, kube kubernetes.Interface, dyn dynamic.Interface, trustDomain string, reg prometheus.Registerer) (*Controller, error) {
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	c := &Controller{log: log, kube: kube, dyn: dyn, trustDomain: trustDomain, metrics: m, trigger: make(chan struct{}, 1)}
	kf := informers.NewSharedInformerFactory(kube, 0)
	df := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	managed := dynamicinformer.NewFilteredDynamicSharedInformerFactory(dyn, 0, metav1.NamespaceAll, func(o *metav1.ListOptions) {
		o.LabelSelector = envoyfilter.LabelManagedBy + "=" + envoyfilter.ManagedByValue
	})
	podInf := kf.Core().V1().Pods()
	nsInf := kf.Core().V1().Namespaces()
	polInf := df.ForResource(input.L7PolicyGVR)
	efInf := managed.ForResource(EnvoyFilterGVR)
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.Trigger() },
		UpdateFunc: func(any, any) { c.Trigger() },
		DeleteFunc: func(any) { c.Trigger() },
	}
	for _, inf := range []cache.SharedIndexInformer{podInf.Informer(), nsInf.Informer(), polInf.Informer(), efInf.Informer()} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return nil, fmt.Errorf("controller: event handler: %w", err)
		}
		c.synced = append(c.synced, inf.HasSynced)
	}
	c.pods, c.nss, c.policies, c.filters = podInf.Lister(), nsInf.Lister(), polInf.Lister(), efInf.Lister()
	c.start = func(stop <-chan struct{}) { kf.Start(stop); df.Start(stop); managed.Start(stop) }
	return c, nil
}

// Trigger asks for a reconcile pass (coalesced).
func (c *Controller) Trigger() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// Start runs the informers until ctx ends. Call it once, with the
// process's context, not the leader's: informers cannot be restarted, so
// caches started under one leadership term would stop with it and a
// re-elected replica would reconcile from a dead cache. Standby replicas
// keep their caches warm this way and take over at once.
func (c *Controller) Start(ctx context.Context) {
	if c.started.CompareAndSwap(false, true) {
		c.start(ctx.Done())
	}
}

// Synced reports whether every informer cache has synced.
func (c *Controller) Synced() bool {
	for _, s := range c.synced {
		if !s() {
			return false
		}
	}
	return c.started.Load()
}

// ErrNotStarted is returned by Run before Start.
var ErrNotStarted = errors.New("controller: Run before Start")

// Run reconciles until ctx ends (one leadership term), retrying failed
// passes with backoff. It may be called again for a later term.
func (c *Controller) Run(ctx context.Context) error {
	if !c.started.Load() {
		return ErrNotStarted
	}
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return fmt.Errorf("controller: caches did not sync: %w", ctx.Err())
	}
	c.metrics.leader.Set(1)
	defer c.metrics.leader.Set(0)
	c.Trigger()
	backoff := time.Second
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.trigger:
		}
		if ctx.Err() != nil {
			return nil // a term that ended while a trigger was pending
		}
		if err := c.Reconcile(ctx); err != nil {
			if ctx.Err() != nil {
				return nil // leadership ended mid-pass
			}
			c.metrics.errors.Inc()
			c.log.Error("l7 policy reconcile", attrError, err)
			time.AfterFunc(backoff, c.Trigger)
			backoff = min(2*backoff, time.Minute)
			continue
		}
		backoff = time.Second
	}
}

// Reconcile makes one full pass from the informer caches.
func (c *Controller) Reconcile(ctx context.Context) error {
	objs, err := c.policies.List(labels.Everything())
	if err != nil {
		return err
	}
	policies := input.DecodePolicies(c.log, objs)
	podObjs, err := c.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	nsObjs, err := c.nss.List(labels.Everything())
	if err != nil {
		return err
	}
	inv := input.Inventory(podObjs, nsObjs)
	res, err := compile.Compile(policies, inv, compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: c.trustDomain})
	if err != nil {
		return err
	}
	desired, groupErrs := envoyfilter.Build(res, inv.Pods, policies)

	var errs []error
	keep := map[string]bool{}
	for _, want := range desired {
		keep[want.GetNamespace()+"/"+want.GetName()] = true
		if err := c.write(ctx, want); err != nil {
			errs = append(errs, err)
		}
	}
	existing, err := c.filters.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, o := range existing {
		u := o.(*unstructured.Unstructured)
		if keep[u.GetNamespace()+"/"+u.GetName()] {
			continue
		}
		err := c.dyn.Resource(EnvoyFilterGVR).Namespace(u.GetNamespace()).Delete(ctx, u.GetName(), metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete envoyfilter %s/%s: %w", u.GetNamespace(), u.GetName(), err))
			continue
		}
		c.metrics.writes.WithLabelValues("delete").Inc()
		c.log.Info("envoyfilter deleted", attrNamespace, u.GetNamespace(), attrName, u.GetName())
	}

	conflicts := map[string][]string{}
	for _, ge := range groupErrs {
		for _, p := range ge.Policies {
			k := ge.Namespace + "/" + p
			conflicts[k] = append(conflicts[k], ge.Err.Error())
		}
	}
	valid, invalid := 0, 0
	for i, rep := range res.Policies {
		if rep.Err != nil {
			invalid++
		} else {
			valid++
		}
		if err := c.writeStatus(ctx, &policies[i], rep, conflicts[rep.Namespace+"/"+rep.Name]); err != nil {
			errs = append(errs, err)
		}
	}
	c.metrics.policies.WithLabelValues("accepted").Set(float64(valid))
	c.metrics.policies.WithLabelValues("invalid").Set(float64(invalid))
	c.metrics.filters.Set(float64(len(desired)))
	if len(errs) > 0 {
		return fmt.Errorf("reconcile: %d errors, first: %w", len(errs), errs[0])
	}
	return nil
}

// write creates or updates one EnvoyFilter, skipping the call when the
// cached object already says the same.
func (c *Controller) write(ctx context.Context, want *unstructured.Unstructured) error {
	ns, name := want.GetNamespace(), want.GetName()
	if o, err := c.filters.ByNamespace(ns).Get(name); err == nil {
		have := o.(*unstructured.Unstructured)
		if equality.Semantic.DeepEqual(have.Object["spec"], want.Object["spec"]) &&
			equality.Semantic.DeepEqual(have.GetOwnerReferences(), want.GetOwnerReferences()) &&
			have.GetAnnotations()[envoyfilter.AnnotationPolicies] == want.GetAnnotations()[envoyfilter.AnnotationPolicies] {
			return nil
		}
	}
	_, err := c.dyn.Resource(EnvoyFilterGVR).Namespace(ns).Apply(ctx, name, want, metav1.ApplyOptions{FieldManager: fieldManager, Force: true})
	if err != nil {
		return fmt.Errorf("apply envoyfilter %s/%s: %w", ns, name, err)
	}
	c.metrics.writes.WithLabelValues("apply").Inc()
	c.log.Info("envoyfilter applied", attrNamespace, ns, attrName, name, "policies", want.GetAnnotations()[envoyfilter.AnnotationPolicies])
	return nil
}

func (c *Controller) writeStatus(ctx context.Context, p *v1alpha1.L7Policy, rep compile.PolicyReport, conflicts []string) error {
	st := p.Status.DeepCopy()
	st.ObservedGeneration = p.Generation
	st.SelectedPods = int32(rep.SelectedPods)
	accepted := metav1.Condition{Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonValid, Message: "the policy is valid", ObservedGeneration: p.Generation}
	enforced := metav1.Condition{Type: ConditionEnforced, Status: metav1.ConditionTrue, Reason: ReasonProgrammed,
		Message: fmt.Sprintf("EnvoyFilters cover the sidecars of the %d selected pods", rep.SelectedPods), ObservedGeneration: p.Generation}
	if rep.Err != nil {
		accepted.Status, accepted.Reason, accepted.Message = metav1.ConditionFalse, v1alpha1.ReasonInvalid, rep.Err.Error()
		enforced.Status, enforced.Reason, enforced.Message = metav1.ConditionFalse, v1alpha1.ReasonInvalid, "the policy is invalid and changes nothing"
	} else if len(conflicts) > 0 {
		enforced.Status, enforced.Reason, enforced.Message = metav1.ConditionFalse, ReasonSelectorConflict, strings.Join(conflicts, "; ")
	}
	meta.SetStatusCondition(&st.Conditions, accepted)
	meta.SetStatusCondition(&st.Conditions, enforced)
	if equality.Semantic.DeepEqual(*st, p.Status) {
		return nil
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&v1alpha1.L7Policy{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: v1alpha1.Kind},
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, ResourceVersion: p.ResourceVersion},
		Spec:       p.Spec,
		Status:     *st,
	})
	if err != nil {
		return err
	}
	_, err = c.dyn.Resource(input.L7PolicyGVR).Namespace(p.Namespace).UpdateStatus(ctx, &unstructured.Unstructured{Object: obj}, metav1.UpdateOptions{FieldManager: fieldManager})
	if err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
		return fmt.Errorf("status of l7policy %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

type metrics struct {
	policies *prometheus.GaugeVec
	filters  prometheus.Gauge
	writes   *prometheus.CounterVec
	errors   prometheus.Counter
	leader   prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		policies: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "sidelane_l7_policies", Help: "L7Policies by state (accepted, invalid) at the last reconcile."}, []string{"state"}),
		filters:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "sidelane_l7_envoyfilters", Help: "EnvoyFilters sidelane wants to exist."}),
		writes:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidelane_l7_envoyfilter_writes_total", Help: "EnvoyFilter writes by operation (apply, delete)."}, []string{"op"}),
		errors:   prometheus.NewCounter(prometheus.CounterOpts{Name: "sidelane_l7_reconcile_errors_total", Help: "Failed reconcile passes."}),
		leader:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "sidelane_controller_leader", Help: "1 while this replica holds the writer Lease and reconciles."}),
	}
	if reg != nil {
		for _, col := range []prometheus.Collector{m.policies, m.filters, m.writes, m.errors, m.leader} {
			if err := reg.Register(col); err != nil {
				return nil, fmt.Errorf("register l7 metrics: %w", err)
			}
		}
	}
	return m, nil
}
